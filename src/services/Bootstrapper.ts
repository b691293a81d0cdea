/**
 * Bootstrapper: reaches the sicksync daemon of an SSH destination, starting it — and first
 * installing it — when needed, and hands back an `Endpoint` whose byte stream is an SSH port-forward
 * to the daemon's loopback port.
 *
 * - One SSH connection per (user, host, port) per process, shared by every destination on that host.
 *   A connection that dies (closed, keepalive timeout, a remote operation that times out) is dropped,
 *   and the next `locate` connects again. Connections are closed with the layer's scope.
 * - Honours ~/.ssh/config, ssh-agent and the default keys; host keys are checked against known_hosts
 *   and an unknown or changed key is refused with its fingerprint and the command to trust it.
 * - Remote steps run as `/bin/sh -s` with the script on stdin, so the user's login shell (bash, zsh,
 *   fish…) only ever sees that one command and nothing is parsed from shell banners: scripts print
 *   `key=value` lines, start-daemon prints one JSON ready line.
 * - Zero install: if neither `sicksync` of our version is on the remote PATH nor our agent bundle is
 *   already in ~/.sicksync/agents/<version>/, the bundle this process runs from is uploaded over SFTP
 *   (temp name, sha256 checked on the remote, then renamed into place) and run with the remote's node.
 */
import { Context, Data, Deferred, Duration, Effect, Either, ExecutionStrategy, Exit, FiberId, Layer, Option, Schema, Scope } from "effect"
import { createHash, randomBytes } from "node:crypto"
import * as fs from "node:fs/promises"
import * as fsSync from "node:fs"
import type * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { Duplex } from "node:stream"
import type { AnyAuthMethod, Client, ClientChannel, ParsedKey, SFTPWrapper } from "ssh2"
import type { ResolvedDestination } from "../schemas/ConfigFile.js"
import { DaemonState, PROTOCOL_VERSION, ReadyLine } from "../schemas/Protocol.js"
import { VERSION } from "../version.js"
import type { Endpoint } from "./DaemonLocator.js"
import {
  fingerprint,
  hostKeyAlgorithms,
  type HostKeyVerdict,
  type KnownHostEntry,
  keyTypeOf,
  knownKeyTypes,
  parseKnownHosts,
  verifyHostKey
} from "./ssh/KnownHosts.js"
import { makePacketBuffers, reusePacketBuffers } from "./ssh/packetPool.js"
import { resolveTarget, type SshTarget, tildify } from "./ssh/SshTarget.js"

// ---- errors -----------------------------------------------------------------------------------

/** The SSH connection could not be made or was lost. */
export class SshError extends Data.TaggedError("SshError")<{
  readonly host: string
  readonly reason:
    | "unreachable"
    | "timeout"
    | "lost"
    | "host-key-unknown"
    | "host-key-changed"
    | "host-key-revoked"
    | "auth"
    | "config"
  readonly message: string
}> {}

/** A step run on the remote failed; `stderr` is the remote's own words. */
export class RemoteStepFailed extends Data.TaggedError("RemoteStepFailed")<{
  readonly host: string
  readonly step: "state" | "probe" | "upload" | "start-daemon"
  readonly exitCode: number | null
  readonly stderr: string
  readonly message: string
}> {}

/** The remote has no Node.js that can run the agent. */
export class NoUsableNode extends Data.TaggedError("NoUsableNode")<{
  readonly host: string
  readonly found: string
  readonly message: string
}> {}

/** A daemon runs but cannot be used: another version, or it did not answer through the tunnel. */
export class DaemonUnavailable extends Data.TaggedError("DaemonUnavailable")<{
  readonly host: string
  readonly reason: "version" | "tunnel" | "state"
  readonly message: string
}> {}

export type BootstrapError = SshError | RemoteStepFailed | NoUsableNode | DaemonUnavailable

/** Whether trying again later can help: not for trust, authentication, configuration or a missing Node. */
export const isRetryable = (error: BootstrapError): boolean => {
  switch (error._tag) {
    case "SshError":
      return error.reason === "unreachable" || error.reason === "timeout" || error.reason === "lost"
    case "NoUsableNode":
      return false
    case "RemoteStepFailed":
    case "DaemonUnavailable":
      return true
  }
}

// ---- the service --------------------------------------------------------------------------------

export class Bootstrapper extends Context.Tag("sicksync/Bootstrapper")<
  Bootstrapper,
  {
    /** Finds (starting, installing if needed) the daemon of an SSH destination and opens a tunnel to it. */
    readonly locate: (dest: ResolvedDestination) => Effect.Effect<Endpoint, BootstrapError>
  }
>() {}

export interface BootstrapperOptions {
  /** The single-file bundle to install on remotes: the file this CLI runs from. */
  readonly agentBundle: string
  /** Whose ~/.ssh to use; defaults to `os.homedir()`. */
  readonly home?: string
  /** The ssh-agent socket; defaults to `$SSH_AUTH_SOCK`. */
  readonly authSock?: string | undefined
  /** SSH handshake and authentication. Default 15 s. */
  readonly connectTimeout?: Duration.DurationInput
  /** Each short remote step (reading state, probing). Default 15 s. */
  readonly stepTimeout?: Duration.DurationInput
  /** Uploading the agent. Default 120 s. */
  readonly uploadTimeout?: Duration.DurationInput
  /** Running start-daemon (it waits up to 10 s for the daemon itself). Default 30 s. */
  readonly startTimeout?: Duration.DurationInput
  /** SSH keepalive: a connection that misses `keepaliveCountMax` probes is dropped. Default 2 s × 3. */
  readonly keepaliveIntervalMs?: number
  readonly keepaliveCountMax?: number
}

/** The minimum Node.js major version the agent bundle runs on. */
const MIN_NODE_MAJOR = 20
/** A located tunnel not used by then is closed (its WebSocket never came). */
const UNUSED_TUNNEL_MS = 30_000

const decodeState = Schema.decodeUnknownEither(Schema.parseJson(DaemonState))
const decodeReady = Schema.decodeUnknownEither(Schema.parseJson(ReadyLine))

/** Quotes one word for /bin/sh. */
const shQuote = (word: string) => `'${word.replace(/'/g, `'\\''`)}'`

/** `key=value` lines (first occurrence wins; other lines, e.g. from a chatty rc file, are ignored). */
const parseLines = (text: string) => {
  const map = new Map<string, string>()
  for (const line of text.split("\n")) {
    const i = line.indexOf("=")
    if (i > 0 && /^[A-Za-z]+$/.test(line.slice(0, i)) && !map.has(line.slice(0, i))) map.set(line.slice(0, i), line.slice(i + 1))
  }
  return map
}

const lastLines = (text: string, n = 15) => text.trim().split("\n").slice(-n).join("\n")

// ---- remote scripts (POSIX sh; builtins only until node is found) ------------------------------

/** Prints `home=`, and `state=` with `alive=` when a state file exists (its pid checked with kill -0). */
const STATE_SCRIPT = `
f="$HOME/.sicksync/daemon.json"
printf 'home=%s\\n' "$HOME"
if [ -r "$f" ]; then
  s=
  IFS= read -r s < "$f" || true
  printf 'state=%s\\n' "$s"
  pid=\${s#*\\"pid\\":}
  pid=\${pid%%[!0-9]*}
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo alive=1; else echo alive=0; fi
fi
`

/** Node's version and the sha256 of the installed agent (empty if none), from the remote's node. */
const NODE_PROBE_JS =
  'var h="";try{h=require("crypto").createHash("sha256").update(require("fs").readFileSync(process.argv[1])).digest("hex")}catch(e){}' +
  'console.log("nodeVersion="+process.versions.node);console.log("agentSha="+h)'

const probeScript = (agentPath: string) => `
printf 'path=%s\\n' "$PATH"
p=
for n in node nodejs; do
  p=$(command -v "$n" 2>/dev/null) || p=
  [ -n "$p" ] && break
done
printf 'node=%s\\n' "$p"
if [ -n "$p" ]; then "$p" -e ${shQuote(NODE_PROBE_JS)} ${shQuote(agentPath)}; fi
if s=$(command -v sicksync 2>/dev/null); then
  printf 'sicksync=%s\\n' "$s"
  v=$(sicksync --version 2>/dev/null) || v=
  printf 'sicksyncVersion=%s\\n' "$v"
fi
`

/** Checks the uploaded temp file's sha256 on the remote, then renames it into place (atomically). */
const INSTALL_JS =
  'var fs=require("fs"),a=process.argv,h=require("crypto").createHash("sha256").update(fs.readFileSync(a[1])).digest("hex");' +
  'if(h!==a[3]){fs.unlinkSync(a[1]);console.error("the uploaded agent is corrupt (sha256 "+h+", expected "+a[3]+")");process.exit(3)}' +
  "fs.chmodSync(a[1],493);fs.renameSync(a[1],a[2])"

const installScript = (node: string, temp: string, final: string, sha256: string) =>
  `exec ${shQuote(node)} -e ${shQuote(INSTALL_JS)} ${shQuote(temp)} ${shQuote(final)} ${sha256}\n`

const startScript = (argv: ReadonlyArray<string>, home: string, port: number) =>
  `cd ${shQuote(home)} 2>/dev/null\nexec ${argv.map(shQuote).join(" ")} start-daemon --port ${port}\n`

// ---- connections ---------------------------------------------------------------------------------

interface Connection {
  readonly target: SshTarget
  readonly client: Client
  /** Serialises "is a daemon running, else start one" per host, so two destinations do not both install. */
  readonly bootLock: Effect.Semaphore
  readonly isDead: () => boolean
  /** Drops the connection (after a timeout: it may be half-dead) so the next locate reconnects. */
  readonly kill: () => void
}

interface Slot {
  readonly ready: Deferred.Deferred<Connection, BootstrapError>
  dead: boolean
  scope: Scope.CloseableScope | undefined
  client: Client | undefined
}

interface ExecResult {
  readonly code: number | null
  readonly signal: string | undefined
  readonly stdout: string
  readonly stderr: string
}

interface RemoteState {
  readonly home: string
  readonly state: DaemonState | undefined
  readonly alive: boolean
}

const noop = () => undefined

/**
 * ssh2 writes each packet to the socket as it makes it, in three writes: what is written during one
 * turn of the event loop goes out in one system call instead.
 */
const corkEachTick = (sock: net.Socket | undefined) => {
  if (sock === undefined) return
  const write = sock.write.bind(sock) as (...args: Array<unknown>) => boolean
  let corked = false
  const uncork = () => {
    corked = false
    sock.uncork()
  }
  sock.write = ((...args: Array<unknown>) => {
    if (!corked) {
      corked = true
      sock.cork()
      process.nextTick(uncork)
    }
    return write(...args)
  }) as typeof sock.write
}

type WriteCallback = (error?: Error | null) => void
type ChannelWrite = (data: Buffer, encoding: string, cb: WriteCallback) => void

/** The largest SSH packet payload the server takes on this channel (OpenSSH: 32 KiB). */
const packetSizeOf = (channel: ClientChannel) =>
  (channel as unknown as { outgoing?: { packetSize?: number } }).outgoing?.packetSize ?? 32 * 1024

/**
 * The chunks written while the socket was corked, as the writes to make on the channel, every one
 * a whole number of full packets but the last: small chunks are joined (cut where a packet ends), a
 * large one goes on as a view of itself, its head topping up the packet before it and its tail
 * starting the next (ssh2 cuts a write into packets, copying each once anyway).
 */
export const joinSmallWrites = (chunks: ReadonlyArray<Buffer>, packetSize: number): Array<Buffer> => {
  const writes: Array<Buffer> = []
  let run: Array<Buffer> = []
  let runBytes = 0
  const endRun = () => {
    if (run.length > 0) writes.push(run.length === 1 ? run[0]! : Buffer.concat(run))
    run = []
    runBytes = 0
  }
  const add = (piece: Buffer) => {
    if (piece.byteLength === 0) return
    run.push(piece)
    runBytes += piece.byteLength
  }
  for (let chunk of chunks) {
    if (runBytes > 0 && runBytes + chunk.byteLength >= packetSize) {
      const head = packetSize - runBytes
      add(chunk.subarray(0, head))
      endRun()
      chunk = chunk.subarray(head)
    }
    const whole = chunk.byteLength - (chunk.byteLength % packetSize)
    if (whole > 0) writes.push(whole === chunk.byteLength ? chunk : chunk.subarray(0, whole))
    add(chunk.subarray(whole))
  }
  endRun()
  return writes
}

/** What `http`/`ws` expect of a socket, on an SSH channel (as ssh2's own HTTP agent does). */
const asSocket = (channel: ClientChannel): Duplex => {
  const write = (channel as unknown as { _write: ChannelWrite })._write.bind(channel)
  return Object.assign(channel, {
    // ssh2 sends each write as an SSH packet of its own (random padding, a cipher and a syscall each):
    // the small frames written while the socket is corked go out joined, in full-size packets. A big
    // sync of small files over SSH spent more client CPU on packets than on everything else.
    _writev: (chunks: ReadonlyArray<{ readonly chunk: Buffer }>, callback: WriteCallback) => {
      const writes = joinSmallWrites(chunks.map((c) => c.chunk), packetSizeOf(channel))
      // ssh2 calls back at once, or once the channel's window has room for the rest of the write.
      const next = (i: number): void =>
        i === writes.length ? callback() : write(writes[i]!, "buffer", (error) => (error ? callback(error) : next(i + 1)))
      next(0)
    },
    setKeepAlive: noop,
    setNoDelay: noop,
    setTimeout: noop,
    ref: noop,
    unref: noop,
    destroySoon: () => channel.destroy()
  })
}

export const make = (options: BootstrapperOptions) =>
  Effect.gen(function* () {
    const layerScope = yield* Effect.scope
    const home = options.home ?? os.homedir()
    const connectTimeout = Duration.toMillis(options.connectTimeout ?? "15 seconds")
    const stepTimeout = Duration.decode(options.stepTimeout ?? "15 seconds")
    const uploadTimeout = Duration.decode(options.uploadTimeout ?? "120 seconds")
    const startTimeout = Duration.decode(options.startTimeout ?? "30 seconds")
    const connections = new Map<string, Slot>()
    const packets = makePacketBuffers()

    if (!/^[0-9A-Za-z.+-]+$/.test(VERSION)) return yield* Effect.dieMessage(`unexpected version string ${VERSION}`)
    const agentRel = `.sicksync/agents/${VERSION}/sicksync.mjs`

    // Loaded on first use: evaluating ssh2 costs ~150 ms, which commands without SSH destinations (and
    // the daemon, which runs from the same bundle) should not pay.
    const ssh2 = yield* Effect.cached(Effect.promise(() => import("ssh2").then((m) => m.default)))

    /** Our own bundle, read once: the bytes uploaded are the bytes hashed. */
    const agent = yield* Effect.cached(
      Effect.tryPromise({
        try: () => fs.readFile(options.agentBundle),
        catch: (cause) =>
          new RemoteStepFailed({
            host: "localhost",
            step: "upload",
            exitCode: null,
            stderr: "",
            message: `cannot read the agent bundle ${options.agentBundle} to install it: ${String(cause)}`
          })
      }).pipe(Effect.map((bytes) => ({ bytes, sha256: createHash("sha256").update(bytes).digest("hex") })))
    )

    // ---- resolving and connecting ----

    // Small local files (ssh config, keys, known_hosts) read synchronously: through the thread pool,
    // each read waits a turn of an event loop that a running scan shares out in slices.
    const readOptional = (file: string) =>
      Effect.sync((): Buffer | undefined => {
        try {
          return fsSync.readFileSync(file)
        } catch {
          return undefined
        }
      })

    const resolve = (dest: ResolvedDestination) =>
      Effect.gen(function* () {
        const sshConfig = yield* readOptional(path.join(home, ".ssh", "config"))
        const localUser = yield* Effect.sync(() => {
          try {
            return os.userInfo().username
          } catch {
            return process.env.USER ?? "root"
          }
        })
        return yield* Effect.try({
          try: () =>
            resolveTarget(dest, {
              home,
              localUser,
              sshConfig: sshConfig?.toString("utf8"),
              authSock: "authSock" in options ? options.authSock : process.env.SSH_AUTH_SOCK
            }),
          catch: (cause) =>
            new SshError({ host: dest.hostname, reason: "config", message: `cannot read ~/.ssh/config: ${String(cause)}` })
        })
      })

    const authMethods = (target: SshTarget) =>
      Effect.gen(function* () {
        const { utils } = yield* ssh2
        const methods: Array<AnyAuthMethod> = []
        const tried: Array<string> = []
        const skipped: Array<string> = []
        if (target.agent !== undefined) {
          methods.push({ type: "agent", username: target.user, agent: target.agent })
          tried.push(`ssh-agent (${target.agent})`)
        }
        for (const file of target.identityFiles) {
          const bytes = yield* readOptional(file)
          if (bytes === undefined) {
            if (target.explicitIdentityFiles.includes(file)) skipped.push(`${tildify(file, home)} (not found)`)
            continue
          }
          const parsed = utils.parseKey(bytes)
          const key: ParsedKey | Error | undefined = Array.isArray(parsed) ? (parsed[0] as ParsedKey | undefined) : parsed
          if (key === undefined || key instanceof Error) {
            const why = key instanceof Error ? key.message : "no key in it"
            skipped.push(`${tildify(file, home)} (${/passphrase/i.test(why) ? "encrypted: add it to ssh-agent" : why})`)
            continue
          }
          methods.push({ type: "publickey", username: target.user, key })
          tried.push(tildify(file, home))
        }
        return { methods, tried, skipped }
      })

    const hostKeyError = (target: SshTarget, verdict: Exclude<HostKeyVerdict, { _tag: "Trusted" }>, key: Buffer) => {
      const print = `${keyTypeOf(key)} key ${fingerprint(key)}`
      const scan = `ssh-keyscan ${target.port === 22 ? "" : `-p ${target.port} `}${target.hostname} >> ~/.ssh/known_hosts`
      const knownHostsFile = tildify(target.knownHostsFiles[0] ?? "~/.ssh/known_hosts", home)
      switch (verdict._tag) {
        case "Unknown":
          return new SshError({
            host: target.label,
            reason: "host-key-unknown",
            message:
              `host key of ${target.hostKeyName} is not known (not in ${knownHostsFile}); it presented ${print}. ` +
              `If that is the host you expect, trust it with: ${scan} (or connect once with ssh and accept it)`
          })
        case "Changed": {
          const known = verdict.known
            .map((e) => `${e.keyType} in ${tildify(e.file, home)}:${e.line}`)
            .join(", ")
          return new SshError({
            host: target.label,
            reason: "host-key-changed",
            message:
              `HOST KEY OF ${target.hostKeyName} HAS CHANGED: it presented ${print}, which does not match the key on record (${known}). ` +
              `Someone could be intercepting the connection, or the host was reinstalled. If you are sure the new key is right: ` +
              `ssh-keygen -R ${shQuote(target.hostKeyName)} && ${scan}`
          })
        }
        case "Revoked":
          return new SshError({
            host: target.label,
            reason: "host-key-revoked",
            message: `host key of ${target.hostKeyName} (${print}) is marked @revoked in ${tildify(verdict.entry.file, home)}:${verdict.entry.line}`
          })
      }
    }

    /** Opens one authenticated SSH connection; `onDead` is called once it closes or fails afterwards. */
    const openClient = (target: SshTarget, onDead: () => void) =>
      Effect.gen(function* () {
        if (target.problem !== undefined) {
          return yield* new SshError({ host: target.label, reason: "config", message: `~/.ssh/config for ${target.alias}: ${target.problem}` })
        }
        const knownHosts: Array<KnownHostEntry> = []
        for (const file of target.knownHostsFiles) {
          const text = yield* readOptional(file)
          if (text !== undefined) knownHosts.push(...parseKnownHosts(file, text.toString("utf8")))
        }
        const auth = yield* authMethods(target)
        const who = `${target.user}@${target.label}`
        if (auth.methods.length === 0) {
          return yield* new SshError({
            host: target.label,
            reason: "auth",
            message:
              `no SSH key to offer for ${who}: no ssh-agent (SSH_AUTH_SOCK is not set) and no usable key among ` +
              `${target.identityFiles.map((f) => tildify(f, home)).join(", ")}` +
              (auth.skipped.length > 0 ? ` (${auth.skipped.join("; ")})` : "") +
              `. Create one with ssh-keygen, or set "identityFile" for this destination`
          })
        }
        const { Client } = yield* ssh2
        return yield* Effect.async<Client, SshError>((resume) => {
          const client = new Client()
          let settled = false
          let refusal: SshError | undefined
          const notes: Array<string> = []
          const settle = (outcome: Effect.Effect<Client, SshError>) => {
            if (settled) return
            settled = true
            resume(outcome)
          }
          client.on("ready", () => {
            reusePacketBuffers(client, packets)
            settle(Effect.succeed(client))
          })
          client.on("error", (error: Error & { level?: string; code?: string }) => {
            if (settled) return onDead()
            // ssh2 reports an unusable agent or key and then goes on with the next method.
            if (error.level === "agent" || (error.level === "client-authentication" && !/All configured/.test(error.message))) {
              notes.push(error.message)
              return
            }
            client.destroy()
            if (refusal !== undefined) return settle(Effect.fail(refusal))
            if (error.level === "client-authentication") {
              return settle(
                Effect.fail(
                  new SshError({
                    host: target.label,
                    reason: "auth",
                    message:
                      `${who} refused our keys: tried ${auth.tried.join(", ")}` +
                      (auth.skipped.length > 0 ? `; skipped ${auth.skipped.join(", ")}` : "") +
                      (notes.length > 0 ? ` (${notes.join("; ")})` : "") +
                      `. Add your public key to ~/.ssh/authorized_keys of ${target.user} on ${target.hostname}, ` +
                      `or point "identityFile" (or IdentityFile in ~/.ssh/config) at the right key`
                  })
                )
              )
            }
            if (error.level === "client-timeout") {
              return settle(
                Effect.fail(
                  new SshError({
                    host: target.label,
                    reason: "timeout",
                    message: `no SSH handshake from ${target.label} within ${Math.round(connectTimeout / 1000)} s`
                  })
                )
              )
            }
            const reason = error.level === "client-socket" || error.level === "client-dns" ? "unreachable" : "lost"
            settle(
              Effect.fail(
                new SshError({ host: target.label, reason, message: `cannot connect to ${target.label} over SSH: ${error.message}` })
              )
            )
          })
          client.on("close", () => {
            onDead()
            settle(
              Effect.fail(
                refusal ??
                  new SshError({ host: target.label, reason: "lost", message: `${target.label} closed the connection during the SSH handshake` })
              )
            )
          })
          const preferred = knownKeyTypes(knownHosts, target.hostKeyName)
          try {
            client.connect({
              host: target.hostname,
              port: target.port,
              username: target.user,
              authHandler: auth.methods,
              readyTimeout: connectTimeout,
              keepaliveInterval: options.keepaliveIntervalMs ?? 2_000,
              keepaliveCountMax: options.keepaliveCountMax ?? 3,
              // Offer the key types on record first, as ssh does, so a host with several keys shows the one we know.
              algorithms: { serverHostKey: hostKeyAlgorithms(preferred) as never },
              hostVerifier: (key: Buffer) => {
                const verdict = verifyHostKey(knownHosts, target.hostKeyName, key)
                if (verdict._tag === "Trusted") return true
                refusal = hostKeyError(target, verdict, key)
                return false
              }
            })
            // From the first packet on: the handshake, each channel open and every save are small packets
            // that Nagle's algorithm would hold for the server's delayed ACK, ~40 ms each (measured: the
            // handshake 115 → 78 ms on 127.0.0.1).
            client.setNoDelay(true)
            corkEachTick((client as unknown as { readonly _sock?: net.Socket })._sock)
          } catch (error) {
            settle(Effect.fail(new SshError({ host: target.label, reason: "config", message: `cannot connect to ${target.label}: ${String(error)}` })))
          }
          return Effect.sync(() => client.destroy())
        })
      })

    /** The shared connection for a target: an open one, one being opened, or a new one. */
    const connection = (target: SshTarget): Effect.Effect<Connection, BootstrapError> =>
      Effect.suspend(() => {
        const existing = connections.get(target.key)
        if (existing !== undefined && !existing.dead) return Deferred.await(existing.ready)
        const slot: Slot = { ready: Deferred.unsafeMake(FiberId.none), dead: false, scope: undefined, client: undefined }
        connections.set(target.key, slot)
        const markDead = () => {
          slot.dead = true
        }
        const open = Effect.gen(function* () {
          // The previous, dead connection's resources go first.
          if (existing?.scope !== undefined) yield* Scope.close(existing.scope, Exit.void)
          const scope = yield* Scope.fork(layerScope, ExecutionStrategy.sequential)
          slot.scope = scope
          const client = yield* Effect.acquireRelease(openClient(target, markDead), (client) =>
            Effect.sync(() => {
              client.end()
              // A half-dead link never acknowledges the goodbye; do not let it hold the process.
              setTimeout(() => client.destroy(), 1_000).unref()
            })
          ).pipe(Scope.extend(scope))
          slot.client = client
          const bootLock = yield* Effect.makeSemaphore(1)
          return {
            target,
            client,
            bootLock,
            isDead: () => slot.dead,
            kill: () => {
              slot.dead = true
              client.destroy()
            }
          } satisfies Connection
        }).pipe(
          Effect.tapError(() => Effect.sync(markDead)),
          Effect.onExit((exit) => Deferred.done(slot.ready, exit))
        )
        // Owned by the layer's scope, so a caller interrupted mid-connect does not strand the others waiting.
        return Effect.zipRight(Effect.forkIn(open, layerScope), Deferred.await(slot.ready))
      })

    // ---- remote steps ----

    /** Fails with a timeout (and drops the connection, which may be half-dead) if `effect` takes too long. */
    const within = <A, E>(conn: Connection, duration: Duration.Duration, what: string, effect: Effect.Effect<A, E>) =>
      effect.pipe(
        Effect.timeoutFail({
          duration,
          onTimeout: () =>
            new SshError({
              host: conn.target.label,
              reason: "timeout",
              message: `${conn.target.label} did not answer within ${Duration.format(duration)} (${what})`
            })
        }),
        Effect.tapError((e) => (e instanceof SshError && e.reason === "timeout" ? Effect.sync(conn.kill) : Effect.void))
      )

    const lost = (conn: Connection, what: string, error: unknown) => {
      conn.kill()
      return new SshError({
        host: conn.target.label,
        reason: "lost",
        message: `lost the SSH connection to ${conn.target.label} (${what}): ${error instanceof Error ? error.message : String(error)}`
      })
    }

    /** A channel the server refused (it has a `reason`) leaves the connection usable; anything else means it is gone. */
    const channelFailure = (conn: Connection, what: string, error: Error) =>
      "reason" in error
        ? new SshError({ host: conn.target.label, reason: "lost", message: `${conn.target.label} refused a channel (${what}): ${error.message}` })
        : lost(conn, what, error)

    /** Runs a script with `/bin/sh -s` (no TTY) and collects its output. */
    const run = (conn: Connection, script: string, what: string, timeout: Duration.Duration = stepTimeout) =>
      within(
        conn,
        timeout,
        what,
        Effect.async<ExecResult, SshError>((resume) => {
          let channel: ClientChannel | undefined
          try {
            conn.client.exec("/bin/sh -s", (error, stream) => {
              if (error) return resume(Effect.fail(channelFailure(conn, what, error)))
              channel = stream
              const out: Array<Buffer> = []
              const err: Array<Buffer> = []
              let code: number | null = null
              let signal: string | undefined
              stream.on("data", (d: Buffer) => out.push(d))
              stream.stderr.on("data", (d: Buffer) => err.push(d))
              stream.on("exit", (c: number | null, s?: string) => {
                code = c
                signal = s
              })
              stream.on("close", () =>
                resume(
                  Effect.succeed({
                    code,
                    signal,
                    stdout: Buffer.concat(out).toString("utf8"),
                    stderr: Buffer.concat(err).toString("utf8")
                  })
                )
              )
              stream.end(script)
            })
          } catch (error) {
            resume(Effect.fail(lost(conn, what, error)))
          }
          return Effect.sync(() => channel?.close())
        })
      )

    const readState = (conn: Connection) =>
      Effect.gen(function* () {
        const r = yield* run(conn, STATE_SCRIPT, "reading ~/.sicksync/daemon.json")
        const kv = parseLines(r.stdout)
        const remoteHome = kv.get("home") ?? ""
        if (r.code !== 0 || !remoteHome.startsWith("/")) {
          return yield* new RemoteStepFailed({
            host: conn.target.label,
            step: "state",
            exitCode: r.code,
            stderr: r.stderr,
            message: `cannot read the daemon state on ${conn.target.label} (exit ${r.code}, $HOME ${JSON.stringify(remoteHome)}): ${lastLines(r.stderr)}`
          })
        }
        const text = kv.get("state")
        return {
          home: remoteHome,
          state: text === undefined ? undefined : Either.getOrUndefined(decodeState(text)),
          alive: kv.get("alive") === "1"
        } satisfies RemoteState
      })

    const sftpCall = <A>(conn: Connection, what: string, f: (cb: (error: Error | null | undefined, value?: A) => void) => void) =>
      Effect.async<A, RemoteStepFailed | SshError>((resume) => {
        try {
          f((error, value) =>
            resume(
              error
                ? Effect.fail(
                    new RemoteStepFailed({
                      host: conn.target.label,
                      step: "upload",
                      exitCode: null,
                      stderr: error.message,
                      message: `cannot ${what} on ${conn.target.label} over SFTP: ${error.message}`
                    })
                  )
                : Effect.succeed(value as A)
            )
          )
        } catch (error) {
          resume(Effect.fail(lost(conn, what, error)))
        }
      })

    /** Writes `bytes` to a new remote file with many writes in flight (one at a time is an RTT per 32 KiB). */
    const writeRemoteFile = (conn: Connection, sftp: SFTPWrapper, file: string, bytes: Buffer) =>
      Effect.gen(function* () {
        const handle = yield* sftpCall<Buffer>(conn, `create ${file}`, (cb) => sftp.open(file, "wx", { mode: 0o600 }, cb))
        const written = sftpCall<void>(conn, `write ${file}`, (cb) => {
          const CHUNK = 32 * 1024
          const IN_FLIGHT = 32
          let next = 0
          let inFlight = 0
          let failed = false
          const pump = () => {
            while (!failed && inFlight < IN_FLIGHT && next < bytes.length) {
              const offset = next
              const length = Math.min(CHUNK, bytes.length - offset)
              next += length
              inFlight++
              sftp.write(handle, bytes, offset, length, offset, (error) => {
                inFlight--
                if (failed) return
                if (error) {
                  failed = true
                  return cb(error)
                }
                if (next >= bytes.length && inFlight === 0) return cb(null)
                pump()
              })
            }
            if (bytes.length === 0) cb(null)
          }
          pump()
        })
        yield* Effect.ensuring(
          written,
          sftpCall<void>(conn, `close ${file}`, (cb) => sftp.close(handle, cb)).pipe(Effect.ignore)
        )
      })

    const mkdirIfMissing = (conn: Connection, sftp: SFTPWrapper, dir: string, mode: number) =>
      sftpCall<unknown>(conn, `stat ${dir}`, (cb) => sftp.stat(dir, cb)).pipe(
        Effect.catchAll(() =>
          sftpCall<void>(conn, `create ${dir}`, (cb) => sftp.mkdir(dir, { mode }, cb)).pipe(
            // Another client may have created it meanwhile.
            Effect.catchAll((error) => Effect.flatMap(Effect.either(sftpCall<unknown>(conn, `stat ${dir}`, (cb) => sftp.stat(dir, cb))), (r) => (Either.isRight(r) ? Effect.void : Effect.fail(error))))
          )
        )
      )

    /** Uploads our bundle to ~/.sicksync/agents/<version>/sicksync.mjs (temp name, checked, renamed). */
    const install = (conn: Connection, remoteHome: string, node: string) =>
      Effect.gen(function* () {
        const { bytes, sha256 } = yield* agent
        const dirs = [".sicksync", ".sicksync/agents", `.sicksync/agents/${VERSION}`].map((d) => path.posix.join(remoteHome, d))
        const final = path.posix.join(remoteHome, agentRel)
        const temp = `${final}.${randomBytes(6).toString("hex")}.tmp`
        yield* Effect.log(`${conn.target.label}: installing sicksync ${VERSION} (${Math.round(bytes.length / 1024)} KiB) in ~/${path.posix.dirname(agentRel)}/`)
        yield* within(
          conn,
          uploadTimeout,
          "uploading the agent",
          Effect.acquireUseRelease(
            sftpCall<SFTPWrapper>(conn, "open an SFTP session", (cb) => conn.client.sftp(cb)),
            (sftp) =>
              Effect.gen(function* () {
                for (const [i, dir] of dirs.entries()) yield* mkdirIfMissing(conn, sftp, dir, i === 0 ? 0o700 : 0o755)
                yield* writeRemoteFile(conn, sftp, temp, bytes)
              }),
            (sftp) => Effect.sync(() => sftp.end())
          )
        )
        const r = yield* run(conn, installScript(node, temp, final, sha256), "checking the uploaded agent")
        if (r.code !== 0) {
          return yield* new RemoteStepFailed({
            host: conn.target.label,
            step: "upload",
            exitCode: r.code,
            stderr: r.stderr,
            message: `cannot install the agent on ${conn.target.label}: ${lastLines(r.stderr) || `exit code ${r.code}`}`
          })
        }
      })

    /** How to run sicksync on the remote: an installed one of our version, else our agent (installed if needed). */
    const agentCommand = (conn: Connection, remoteHome: string) =>
      Effect.gen(function* () {
        const label = conn.target.label
        const r = yield* run(conn, probeScript(path.posix.join(remoteHome, agentRel)), "looking for node and sicksync")
        const kv = parseLines(r.stdout)
        const installed = kv.get("sicksync")
        if (installed !== undefined && installed !== "" && kv.get("sicksyncVersion")?.trim() === VERSION) return [installed]
        const node = kv.get("node") ?? ""
        const nodeVersion = kv.get("nodeVersion")
        const advice = `Install Node.js ${MIN_NODE_MAJOR} or newer on ${conn.target.hostname} (on the PATH of non-interactive SSH sessions), or install sicksync ${VERSION} there`
        if (node === "") {
          const found = `no node or nodejs on PATH (${kv.get("path") ?? "?"})`
          return yield* new NoUsableNode({ host: label, found, message: `${label} has no usable Node.js: ${found}. ${advice}` })
        }
        if (nodeVersion === undefined) {
          const found = `${node} does not run: ${lastLines(r.stderr, 3) || `exit code ${r.code}`}`
          return yield* new NoUsableNode({ host: label, found, message: `${label} has no usable Node.js: ${found}. ${advice}` })
        }
        if (Number(nodeVersion.split(".")[0]) < MIN_NODE_MAJOR) {
          const found = `${node} is Node.js ${nodeVersion}`
          return yield* new NoUsableNode({ host: label, found, message: `${label} has no usable Node.js: ${found}. ${advice}` })
        }
        const { sha256 } = yield* agent
        if (kv.get("agentSha") !== sha256) yield* install(conn, remoteHome, node)
        return [node, path.posix.join(remoteHome, agentRel)]
      })

    const startDaemon = (conn: Connection, remoteHome: string, dest: ResolvedDestination) =>
      Effect.gen(function* () {
        const label = conn.target.label
        const argv = yield* agentCommand(conn, remoteHome)
        const r = yield* run(conn, startScript(argv, remoteHome, dest.websocketPort), "starting the daemon", startTimeout)
        const lines = r.stdout.trim().split("\n")
        const ready = decodeReady(lines[lines.length - 1] ?? "")
        if (r.code !== 0 || Either.isLeft(ready)) {
          const why = lastLines(r.stderr) || (r.code !== 0 ? `exit code ${r.code}${r.signal ? ` (${r.signal})` : ""}` : `unexpected output: ${lastLines(r.stdout, 3)}`)
          return yield* new RemoteStepFailed({
            host: label,
            step: "start-daemon",
            exitCode: r.code,
            stderr: r.stderr,
            message: `cannot start the daemon on ${label}: ${why}`
          })
        }
        if (ready.right.started) yield* Effect.log(`${label}: started the sicksync daemon (pid ${ready.right.pid})`)
        return ready.right
      })

    const checkVersion = (conn: Connection, state: { readonly version: string; readonly protocolVersion: number; readonly pid: number }) =>
      state.version === VERSION && state.protocolVersion === PROTOCOL_VERSION
        ? Effect.void
        : Effect.fail(
            new DaemonUnavailable({
              host: conn.target.label,
              reason: "version",
              // Never speak to another version; it exits by itself once its last client has left.
              message:
                `a sicksync daemon of version ${state.version} (protocol ${state.protocolVersion}, pid ${state.pid}) runs on ${conn.target.label}; ` +
                `this is ${VERSION}. It exits after its last client leaves, or stop it with \`ssh ${conn.target.alias} kill ${state.pid}\``
            })
          )

    /** A port-forward to the daemon's loopback port; `None` when nothing accepts there. */
    const tunnel = (conn: Connection, port: number) =>
      within(
        conn,
        stepTimeout,
        "opening the tunnel",
        Effect.async<Option.Option<ClientChannel>, SshError>((resume) => {
          let channel: ClientChannel | undefined
          try {
            conn.client.forwardOut("127.0.0.1", 0, "127.0.0.1", port, (error, stream) => {
              if (error) {
                // The server answered with a refusal: the connection itself is fine.
                if ("reason" in error) return resume(Effect.succeed(Option.none()))
                return resume(Effect.fail(lost(conn, "opening the tunnel", error)))
              }
              channel = stream
              resume(Effect.succeed(Option.some(stream)))
            })
          } catch (error) {
            resume(Effect.fail(lost(conn, "opening the tunnel", error)))
          }
          return Effect.sync(() => channel?.close())
        })
      )

    const endpoint = (state: DaemonState, channel: ClientChannel): Endpoint => {
      let taken = false
      const timer = setTimeout(() => channel.close(), UNUSED_TUNNEL_MS)
      timer.unref()
      return {
        url: `ws://127.0.0.1:${state.port}`,
        token: state.token,
        // One WebSocket per located tunnel; a second use gets a stream that fails at once.
        createConnection: () => {
          if (taken) {
            const used = new Duplex({ read: noop, write: (_chunk, _encoding, cb) => cb() })
            process.nextTick(() => used.destroy(new Error("this tunnel was already used; locate the daemon again")))
            return used
          }
          taken = true
          clearTimeout(timer)
          return asSocket(channel)
        }
      }
    }

    const locate = Effect.fn("Bootstrapper.locate")(function* (dest: ResolvedDestination) {
      const target = yield* resolve(dest)
      const conn = yield* connection(target)
      return yield* conn.bootLock.withPermits(1)(
        Effect.gen(function* () {
          // First the daemon that the state file names, if its pid lives and its port answers.
          const current = yield* readState(conn)
          if (current.state !== undefined && current.alive) {
            const open = yield* tunnel(conn, current.state.port)
            if (Option.isSome(open)) {
              yield* Effect.tapError(checkVersion(conn, current.state), () => Effect.sync(() => open.value.close()))
              return endpoint(current.state, open.value)
            }
          }
          // Otherwise start one (start-daemon itself settles races between clients on the lock file).
          const ready = yield* startDaemon(conn, current.home, dest)
          yield* checkVersion(conn, ready)
          const after = yield* readState(conn)
          if (after.state === undefined || after.state.pid !== ready.pid) {
            return yield* new DaemonUnavailable({
              host: conn.target.label,
              reason: "state",
              message: `the daemon on ${conn.target.label} (pid ${ready.pid}) started, but ~/.sicksync/daemon.json does not name it`
            })
          }
          yield* checkVersion(conn, after.state)
          const open = yield* tunnel(conn, after.state.port)
          if (Option.isNone(open)) {
            return yield* new DaemonUnavailable({
              host: conn.target.label,
              reason: "tunnel",
              message: `the daemon on ${conn.target.label} (pid ${ready.pid}) does not accept connections on 127.0.0.1:${after.state.port}`
            })
          }
          return endpoint(after.state, open.value)
        })
      )
    })

    return Bootstrapper.of({ locate })
  })

/** Live layer; its SSH connections are closed when the layer's scope closes. */
export const layer = (options: BootstrapperOptions) => Layer.scoped(Bootstrapper, make(options))

/**
 * DaemonLocator: finds the daemon serving a destination — starting it if none answers — and
 * returns where to reach it and the token that opens a session.
 *
 * The `local` transport serves destinations on this machine: the daemon runs as the current user,
 * its state file is `~/.sicksync/daemon.json` here, and it is started with the same
 * `sicksync start-daemon` handshake that the SSH transport runs on a remote. The `ssh` transport is
 * the Bootstrapper's; `layer` dispatches each destination to one or the other by its transport.
 */
import { Context, Data, Effect, Either, Layer, Schema } from "effect"
import { execFile } from "node:child_process"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import type { Duplex } from "node:stream"
import type { ResolvedDestination } from "../schemas/ConfigFile.js"
import { DaemonState, PROTOCOL_VERSION, ReadyLine } from "../schemas/Protocol.js"
import { VERSION } from "../version.js"
import { Bootstrapper, isRetryable } from "./Bootstrapper.js"

/** The session could not be opened. `retryable: false` means trying again cannot help (e.g. a bad root). */
export class ConnectError extends Data.TaggedError("ConnectError")<{
  readonly dest: string
  readonly message: string
  readonly retryable: boolean
}> {}

/** Where a destination's daemon answers, and the secret that opens a session. */
export interface Endpoint {
  readonly url: string
  readonly token: string
  /** A pre-opened byte stream to run the WebSocket over (an SSH tunnel); a TCP connection to `url` otherwise. */
  readonly createConnection?: () => Duplex
}

export class DaemonLocator extends Context.Tag("sicksync/DaemonLocator")<
  DaemonLocator,
  { readonly locate: (dest: ResolvedDestination) => Effect.Effect<Endpoint, ConnectError> }
>() {}

const decodeState = Schema.decodeUnknownEither(Schema.parseJson(DaemonState))
const decodeReady = Schema.decodeUnknownEither(Schema.parseJson(ReadyLine))

const isAlive = (pid: number) => {
  try {
    process.kill(pid, 0)
    return true
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM"
  }
}

export interface LocalOptions {
  /** How to run sicksync itself: `[node, path/to/sicksync.mjs]`. */
  readonly command: ReadonlyArray<string>
  /** Whose daemon: defaults to the current user's home. */
  readonly home?: string
}

/** The command that runs this very sicksync (the single-file bundle). */
export const selfCommand = (): ReadonlyArray<string> => [process.execPath, process.argv[1] ?? "sicksync"]

export const makeLocal = (options: LocalOptions) => {
  const home = options.home ?? os.homedir()
  const stateFile = path.join(home, ".sicksync", "daemon.json")

  const readState = Effect.promise(() => fs.readFile(stateFile, "utf8").catch(() => undefined)).pipe(
    Effect.map((text) => (text === undefined ? undefined : Either.getOrUndefined(decodeState(text))))
  )

  const startDaemon = (dest: ResolvedDestination) =>
    Effect.async<ReadyLine, ConnectError>((resume) => {
      const [command, ...args] = options.command
      const child = execFile(
        command!,
        [...args, "start-daemon", "--port", String(dest.websocketPort)],
        { env: { ...process.env, HOME: home }, timeout: 30_000 },
        (error, stdout, stderr) => {
          const lines = stdout.trim().split("\n")
          const ready = decodeReady(lines[lines.length - 1] ?? "")
          if (error === null && Either.isRight(ready)) return resume(Effect.succeed(ready.right))
          const why = stderr.trim() || (error?.message ?? `unexpected output: ${stdout.trim().slice(0, 200)}`)
          resume(Effect.fail(new ConnectError({ dest: dest.name, message: `cannot start the local daemon: ${why}`, retryable: true })))
        }
      )
      return Effect.sync(() => child.kill())
    })

  const locate = Effect.fn("DaemonLocator.locate")(function* (dest: ResolvedDestination) {
    if (dest.transport !== "local") {
      return yield* new ConnectError({
        dest: dest.name,
        message: `the local daemon locator cannot serve a destination with transport "${dest.transport}"`,
        retryable: false
      })
    }
    let state = yield* readState
    if (state === undefined || !isAlive(state.pid)) {
      yield* startDaemon(dest)
      state = yield* readState
      if (state === undefined) {
        return yield* new ConnectError({ dest: dest.name, message: `the daemon started but ${stateFile} is unreadable`, retryable: true })
      }
    }
    if (state.version !== VERSION || state.protocolVersion !== PROTOCOL_VERSION) {
      // Never speak to another version; it exits by itself once its last client has left.
      return yield* new ConnectError({
        dest: dest.name,
        message: `a sicksync daemon of version ${state.version} (pid ${state.pid}) is running; this is ${VERSION}. It exits after its last client leaves, or stop it with \`kill ${state.pid}\``,
        retryable: true
      })
    }
    return { url: `ws://127.0.0.1:${state.port}`, token: state.token } satisfies Endpoint
  })

  return DaemonLocator.of({ locate })
}

export const layerLocal = (options: LocalOptions) => Layer.succeed(DaemonLocator, makeLocal(options))

/** Every transport: `local` destinations here, `ssh` ones through the Bootstrapper. */
export const make = (options: LocalOptions) =>
  Effect.gen(function* () {
    const bootstrapper = yield* Bootstrapper
    const local = makeLocal(options)
    return DaemonLocator.of({
      locate: (dest) =>
        dest.transport === "local"
          ? local.locate(dest)
          : bootstrapper.locate(dest).pipe(
              Effect.mapError((error) => new ConnectError({ dest: dest.name, message: error.message, retryable: isRetryable(error) }))
            )
    })
  })

export const layer = (options: LocalOptions) => Layer.effect(DaemonLocator, make(options))

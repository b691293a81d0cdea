/**
 * The remote daemon (`sicksync daemon`): a WebSocket server on 127.0.0.1 serving many sessions at once,
 * one per client process, each carrying one channel per destination root. See DESIGN §3/§4 and
 * `schemas/Protocol.ts`.
 *
 * Lifecycle: ~/.sicksync (0700) → lock (O_EXCL, pid) → listen → daemon.json (0600, atomic) → ready signal
 * on `--ready-fd` → serve until no authenticated session for `graceMs` (or SIGINT/SIGTERM) → finalizers
 * remove daemon.json, close the server and drop the lock, in that order.
 */
import {
  Cause,
  Data,
  Deferred,
  Effect,
  Either,
  Exit,
  FiberSet,
  Mailbox,
  Option,
  Runtime,
  Schema,
  Scope,
  Stream,
  SubscriptionRef
} from "effect"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import type { AddressInfo } from "node:net"
import * as os from "node:os"
import * as path from "node:path"
import { type RawData, WebSocket, WebSocketServer } from "ws"
import {
  CHUNK_HEADER_BYTES,
  Closed,
  type DaemonMessage,
  type DaemonState,
  DaemonState as DaemonStateSchema,
  decodeChunk,
  decodeClientMessage,
  encodeDaemonMessage,
  type Hello,
  type ManifestEntry,
  type BatchFile,
  MAX_BATCH_BYTES,
  MAX_BATCH_FILES,
  MAX_FRAME_BYTES,
  MAX_OPEN_WRITES,
  Mkdir,
  type Open,
  Opened,
  OpenFailed,
  type Operation,
  OpFailed,
  type OpErrorCode,
  PROTOCOL_VERSION,
  Rejected,
  Remove,
  Welcome,
  WINDOW_BYTES,
  Write,
  WriteBatch
} from "../schemas/Protocol.js"
import { type DestinationError, DestinationFs, type DestinationFsApi, normalizeRelPath } from "../services/DestinationFs.js"
import { VERSION } from "../version.js"

export const DEFAULT_PORT = 8675
export const DEFAULT_GRACE_MS = 30_000

/**
 * Node flags the daemon runs with; start-daemon puts them on its command line (V8 reads them as it sets
 * up the heap; these keep the daemon's code cache valid, most heap flags do not). `--no-memory-reducer`:
 * half a minute after a big sync, V8's memory reducer shrinks the heap and then grows it slowly, and a
 * big sync after an idle minute ran 18–23 mark-compacts instead of 1–3: the daemon's CPU 1.5–1.8 s
 * instead of 0.9–1.2, an initial sync of 20,000 files 1.9–2.2 s instead of 1.5–1.8 (measured). It
 * costs ~35 MB of resident memory while idle (~150 MB instead of ~115).
 */
export const DAEMON_NODE_FLAGS: ReadonlyArray<string> = ["--no-memory-reducer"]

export interface DaemonOptions {
  /** 0 = any free port. If a fixed port is taken by something else, the daemon falls back to a free port. */
  readonly port: number
  readonly graceMs: number
  /** Defaults to `os.homedir()`. */
  readonly home?: string | undefined
  /** Write one `ReadySignal` JSON line to this fd once listening (or on failure), then close it. */
  readonly readyFd?: number | undefined
  /** Install SIGINT/SIGTERM handlers that shut down cleanly (the CLI does; tests don't). */
  readonly handleSignals?: boolean | undefined
  readonly heartbeatIntervalMs?: number | undefined
  readonly heartbeatTimeoutMs?: number | undefined
  readonly helloTimeoutMs?: number | undefined
}

// ---- paths ------------------------------------------------------------------------------------

export const daemonPaths = (home: string) => {
  const dir = path.join(home, ".sicksync")
  const logDir = path.join(dir, "logs")
  return {
    dir,
    statePath: path.join(dir, "daemon.json"),
    lockPath: path.join(dir, "daemon.lock"),
    logDir,
    logPath: path.join(logDir, "daemon.log")
  } as const
}

// ---- errors -----------------------------------------------------------------------------------

/** Another daemon of this user holds `~/.sicksync/daemon.lock`. */
export class DaemonAlreadyRunning extends Data.TaggedError("DaemonAlreadyRunning")<{
  readonly pid: number
  readonly lockPath: string
  readonly message: string
}> {}

export class DaemonStartError extends Data.TaggedError("DaemonStartError")<{
  readonly step: "state-dir" | "lock" | "listen" | "state-file"
  readonly path: string
  readonly code: string | undefined
  readonly message: string
  readonly cause?: unknown
}> {}

// ---- ready signal (daemon → start-daemon, over --ready-fd) ---------------------------------------

export const ReadySignal = Schema.Union(
  Schema.TaggedStruct("Ready", {
    port: Schema.Int,
    pid: Schema.Int,
    version: Schema.String,
    protocolVersion: Schema.Int
  }),
  Schema.TaggedStruct("AlreadyRunning", { pid: Schema.Int }),
  Schema.TaggedStruct("Failed", { message: Schema.String })
)
export type ReadySignal = typeof ReadySignal.Type
export const decodeReadySignal = Schema.decodeUnknownEither(Schema.parseJson(ReadySignal))
const encodeReadySignal = Schema.encodeSync(Schema.parseJson(ReadySignal))

const writeReadySignal = (fd: number, signal: ReadySignal) =>
  Effect.sync(() => {
    try {
      fs.writeSync(fd, encodeReadySignal(signal) + "\n")
    } catch {
      // the parent may be gone (EPIPE): it will find us through daemon.json
    }
    try {
      fs.closeSync(fd)
    } catch {
      // already closed
    }
  })

// ---- small helpers ----------------------------------------------------------------------------

const errnoCode = (cause: unknown): string | undefined =>
  typeof cause === "object" && cause !== null && "code" in cause && typeof cause.code === "string" ? cause.code : undefined

const errorMessage = (cause: unknown) => (cause instanceof Error ? cause.message : String(cause))

const randomHex = (bytes: number) => crypto.randomBytes(bytes).toString("hex")

/** `process.kill(pid, 0)`: alive, or alive but not ours (EPERM). */
export const isPidAlive = (pid: number): boolean => {
  if (!Number.isInteger(pid) || pid <= 0) return false
  try {
    process.kill(pid, 0)
    return true
  } catch (e) {
    return errnoCode(e) === "EPERM"
  }
}

const readPid = (file: string): number | undefined => {
  try {
    const pid = Number.parseInt(fs.readFileSync(file, "utf8").trim(), 10)
    return Number.isInteger(pid) && pid > 0 ? pid : undefined
  } catch {
    return undefined
  }
}

/** Writes `content` to `file` atomically: a 0600 temp file created with O_EXCL, then rename. */
export const writeFileAtomic = (file: string, content: string): void => {
  const temp = `${file}.${randomHex(8)}.tmp`
  try {
    fs.writeFileSync(temp, content, { flag: "wx", mode: 0o600 })
    fs.renameSync(temp, file)
  } catch (e) {
    fs.rmSync(temp, { force: true })
    throw e
  }
}

/** Creates `file` holding our pid, atomically: false when it exists already. */
const createPidFileExclusive = (file: string): boolean => {
  const temp = `${file}.${process.pid}.${randomHex(4)}.tmp`
  fs.writeFileSync(temp, `${process.pid}\n`, { flag: "wx", mode: 0o600 })
  try {
    fs.linkSync(temp, file) // link(2) fails with EEXIST atomically, and the file is never seen empty
    return true
  } catch (e) {
    if (errnoCode(e) === "EEXIST") return false
    if (errnoCode(e) !== "EPERM" && errnoCode(e) !== "ENOTSUP" && errnoCode(e) !== "EOPNOTSUPP") throw e
    // no hard links on this filesystem: plain O_EXCL
    try {
      fs.writeFileSync(file, `${process.pid}\n`, { flag: "wx", mode: 0o600 })
      return true
    } catch (e2) {
      if (errnoCode(e2) === "EEXIST") return false
      throw e2
    }
  } finally {
    fs.rmSync(temp, { force: true })
  }
}

// ---- state dir, lock, state file ----------------------------------------------------------------

const ensureStateDir = (dir: string) =>
  Effect.try({
    try: () => {
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 })
      fs.chmodSync(dir, 0o700)
    },
    catch: (cause) =>
      new DaemonStartError({
        step: "state-dir",
        path: dir,
        code: errnoCode(cause),
        message: `cannot create ${dir}: ${errorMessage(cause)}`,
        cause
      })
  })

/**
 * Takes `daemon.lock` (O_EXCL, holding our pid). A lock whose pid is alive means another daemon runs;
 * a stale one (dead pid) is taken over under a short-lived `daemon.lock.takeover` mutex so that two
 * daemons racing for the same stale lock cannot both win.
 */
const takeLock = (lockPath: string): Effect.Effect<void, DaemonAlreadyRunning | DaemonStartError> =>
  Effect.gen(function*() {
    const takeoverPath = lockPath + ".takeover"
    const attempt = <A>(f: () => A) =>
      Effect.try({
        try: f,
        catch: (cause) =>
          new DaemonStartError({
            step: "lock",
            path: lockPath,
            code: errnoCode(cause),
            message: `cannot take ${lockPath}: ${errorMessage(cause)}`,
            cause
          })
      })
    for (let i = 0; i < 200; i++) {
      if (yield* attempt(() => createPidFileExclusive(lockPath))) return
      const pid = readPid(lockPath)
      if (pid !== undefined && isPidAlive(pid)) {
        return yield* Effect.fail(
          new DaemonAlreadyRunning({ pid, lockPath, message: `a sicksync daemon is already running (pid ${pid})` })
        )
      }
      if (pid === undefined) {
        // missing (retry now) or unreadable: give a writer that is not using link(2) a moment
        const age = yield* attempt(() => {
          try {
            return Date.now() - fs.statSync(lockPath).mtimeMs
          } catch (e) {
            if (errnoCode(e) === "ENOENT") return -1
            throw e
          }
        })
        if (age < 0) continue
        if (age < 2_000) {
          yield* Effect.sleep(50)
          continue
        }
      }
      // stale lock: take it over under the takeover mutex
      if (yield* attempt(() => createPidFileExclusive(takeoverPath))) {
        yield* attempt(() => {
          try {
            if (readPid(lockPath) === pid) fs.rmSync(lockPath, { force: true })
          } finally {
            fs.rmSync(takeoverPath, { force: true })
          }
        })
        continue
      }
      const holder = readPid(takeoverPath)
      if (holder !== undefined && !isPidAlive(holder)) fs.rmSync(takeoverPath, { force: true })
      yield* Effect.sleep(20)
    }
    return yield* Effect.fail(
      new DaemonStartError({ step: "lock", path: lockPath, code: undefined, message: `could not take ${lockPath}` })
    )
  })

const releaseLock = (lockPath: string) =>
  Effect.sync(() => {
    if (readPid(lockPath) === process.pid) fs.rmSync(lockPath, { force: true })
  })

const encodeState = Schema.encodeSync(Schema.parseJson(DaemonStateSchema))

const writeState = (statePath: string, state: DaemonState) =>
  Effect.acquireRelease(
    Effect.try({
      try: () => writeFileAtomic(statePath, encodeState(state) + "\n"),
      catch: (cause) =>
        new DaemonStartError({
          step: "state-file",
          path: statePath,
          code: errnoCode(cause),
          message: `cannot write ${statePath}: ${errorMessage(cause)}`,
          cause
        })
    }),
    () =>
      Effect.sync(() => {
        // only remove it if it is still ours
        try {
          const current = JSON.parse(fs.readFileSync(statePath, "utf8")) as { pid?: unknown }
          if (current.pid === state.pid && (current as { token?: unknown }).token === state.token) fs.rmSync(statePath)
        } catch {
          // missing or unreadable: nothing to do
        }
      })
  )

// ---- server -------------------------------------------------------------------------------------

const listenOnce = (port: number) =>
  Effect.acquireRelease(
    Effect.async<WebSocketServer, DaemonStartError>((resume) => {
      const wss = new WebSocketServer({
        host: "127.0.0.1",
        port,
        maxPayload: MAX_FRAME_BYTES,
        perMessageDeflate: false,
        clientTracking: true
      })
      const onError = (cause: Error) => {
        wss.close()
        resume(Effect.fail(
          new DaemonStartError({
            step: "listen",
            path: `127.0.0.1:${port}`,
            code: errnoCode(cause),
            message: `cannot listen on 127.0.0.1:${port}: ${cause.message}`,
            cause
          })
        ))
      }
      wss.once("error", onError)
      wss.once("listening", () => {
        wss.off("error", onError)
        resume(Effect.succeed(wss))
      })
      return Effect.sync(() => wss.close())
    }),
    (wss) =>
      Effect.async<void>((resume) => {
        for (const client of wss.clients) client.terminate()
        wss.close(() => resume(Effect.void))
      })
  )

const listen = (port: number) =>
  listenOnce(port).pipe(
    Effect.catchIf(
      (e) => e.code === "EADDRINUSE" && port !== 0,
      (e) => Effect.zipRight(Effect.logWarning(`${e.message}; using a free port instead`), listenOnce(0))
    )
  )

// ---- sessions -----------------------------------------------------------------------------------

interface Frame {
  readonly binary: boolean
  readonly data: Buffer
}

/** A text frame as routed to its channel, decoded once by the session. */
interface TextFrame {
  readonly binary: false
  readonly bytes: number
  readonly text: string
  readonly decoded: ReturnType<typeof decodeClientMessageFast>
}
type ChannelFrame = { readonly binary: true; readonly data: Buffer } | TextFrame

/** Per-connection state shared between ws callbacks and the session fiber. */
interface Connection {
  readonly id: string
  readonly ws: WebSocket
  /** Every frame, in order; the session fiber routes them to their channels. */
  readonly frames: Mailbox.Mailbox<Frame>
  readonly channels: Map<number, Channel>
  lastSeen: number
  /** Bytes received and not yet routed. */
  queuedBinary: number
  queuedText: number
  overflow: boolean
  /** How the socket closed: the code ws sent after rejecting a frame, else the closing handshake's. */
  closeCode: number | undefined
  error: string | undefined
}

/** One destination root of a session, with its own frames, window and ordering. */
interface Channel {
  readonly ch: number
  /** For logs: `session/channel`. */
  readonly id: string
  readonly ws: WebSocket
  readonly frames: Mailbox.Mailbox<ChannelFrame>
  /** Bytes routed here and neither consumed nor credited. */
  queuedBinary: number
  queuedText: number
}

interface SessionContext {
  readonly token: Buffer
  readonly fsApi: DestinationFsApi
  readonly clients: SubscriptionRef.SubscriptionRef<number>
  readonly heartbeatIntervalMs: number
  readonly heartbeatTimeoutMs: number
  readonly helloTimeoutMs: number
}

/** Binary bytes a well-behaved client can have queued on a channel: its window plus frame slack. */
const MAX_QUEUED_BINARY = WINDOW_BYTES + 2 * MAX_FRAME_BYTES
const MAX_QUEUED_TEXT = 64 * 1024 * 1024
/** Frames are routed as they come; this only bounds a session whose router falls far behind. */
const MAX_UNROUTED = 8 * MAX_QUEUED_BINARY
const MAX_CHANNELS = 4096
const MAX_REMEMBERED_FAILED = 4096
const MANIFEST_PAGE = 1000
/** A write up to this size whose bytes are not all there when it may start waits a moment for them. */
const GRACE_BYTES = 1024 * 1024
/** Operations of one session in a filesystem call at once. */
const CONCURRENCY = 32
/** Unfinished operations of one session after which no more frames are read while some of them can progress. */
const MAX_PENDING = 128
/** Unfinished operations beyond which new ones are refused (reachable only when they all wait on frames). */
const MAX_UNFINISHED = 4096

const toBuffer = (data: RawData): Buffer =>
  Buffer.isBuffer(data) ? data : Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data)

/**
 * The close code ws has already sent when its receiver rejected a frame (see ws/lib/receiver.js):
 * 1009 for a frame over `maxPayload`, 1007 for invalid UTF-8, 1008 for too many fragments, else 1002.
 * ws stops reading after such an error, so the peer's closing handshake is never seen and the
 * "close" event would only report 1006; this keeps the code the client was actually given.
 * Undefined for errors of the socket itself.
 */
const receiverCloseCode = (error: Error): number | undefined => {
  const code = errnoCode(error)
  if (code === undefined || !code.startsWith("WS_ERR_")) return undefined
  if (code.startsWith("WS_ERR_UNSUPPORTED_")) return 1009
  if (code === "WS_ERR_INVALID_UTF8") return 1007
  if (code === "WS_ERR_TOO_MANY_BUFFERED_PARTS") return 1008
  return 1002
}

const closeSocket = (ws: WebSocket, code: number, reason: string) => {
  if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) ws.close(code, reason)
}

const sendText = (ws: WebSocket, text: string) => {
  if (ws.readyState === WebSocket.OPEN) ws.send(text)
}

const send = (ws: WebSocket, message: DaemonMessage) => Effect.sync(() => sendText(ws, encodeDaemonMessage(message)))

/** Sends and waits until ws handed the frame to the socket (back-pressure for manifest pages). */
const sendAwait = (ws: WebSocket, text: string) =>
  Effect.async<void>((resume) => {
    if (ws.readyState !== WebSocket.OPEN) return resume(Effect.void)
    ws.send(text, () => resume(Effect.void))
  })

const looseJson = (text: string): Record<string, unknown> | undefined => {
  try {
    const value: unknown = JSON.parse(text)
    return typeof value === "object" && value !== null && !Array.isArray(value)
      ? (value as Record<string, unknown>)
      : undefined
  } catch {
    return undefined
  }
}

const looseSeq = (json: Record<string, unknown> | undefined): number | undefined => {
  const seq = json?.seq
  return typeof seq === "number" && Number.isInteger(seq) && seq >= 0 && seq <= 0xffffffff ? seq : undefined
}

/** The operations a message that could not be decoded stands for: a batch's files, if it lists them. */
const looseCount = (json: Record<string, unknown> | undefined): number | undefined =>
  json?._tag === "WriteBatch" && Array.isArray(json.files) && json.files.length > 1
    ? Math.min(json.files.length, MAX_BATCH_FILES, 0x1_0000_0000 - (looseSeq(json) ?? 0))
    : undefined

/**
 * What a `WriteBatch` must be beyond its schema (its seqs within range, its bytes within one frame), or
 * what is wrong; with its size and ordering keys. Its files are written side by side unless two of them
 * may be one file or one be below the other (a key equal to or an ancestor of another: the same path, or
 * one differing in case only), then one by one, in order.
 */
const checkBatch = (
  batch: WriteBatch
): { readonly size: number; readonly keys: ReadonlyArray<string>; readonly oneByOne: boolean } | string => {
  if (batch.seq + batch.files.length - 1 > 0xffffffff) return `the seqs of its ${batch.files.length} files run past 2^32-1`
  let size = 0
  let oneByOne = false
  const keys = new Set<string>()
  for (const file of batch.files) {
    size += file.size
    const key = orderKey(file.path)
    if (key === undefined) continue // refused when written
    if (keys.has(key)) oneByOne = true
    keys.add(key)
  }
  if (size > MAX_BATCH_BYTES) return `its files add up to ${size} bytes, more than ${MAX_BATCH_BYTES}`
  if (!oneByOne) {
    for (const key of keys) if (ancestorsOf(key).some((a) => keys.has(a))) oneByOne = true
  }
  return { size, keys: [...keys], oneByOne }
}

const describeTag = (json: Record<string, unknown> | undefined) =>
  typeof json?._tag === "string" ? JSON.stringify(json._tag.slice(0, 40)) : "none"

const errorCode = (e: DestinationError): OpErrorCode => (e._tag === "ConfinementError" ? "confinement" : "io")

/** Compares the presented token with ours in constant time (over equal-length buffers). */
const tokenMatches = (expected: Buffer, presented: string): boolean => {
  const given = Buffer.from(presented, "utf8")
  if (given.byteLength !== expected.byteLength) {
    crypto.timingSafeEqual(expected, expected)
    return false
  }
  return crypto.timingSafeEqual(given, expected)
}

const heartbeat = (conn: Connection, ctx: SessionContext) =>
  Effect.gen(function*() {
    while (true) {
      yield* Effect.sleep(ctx.heartbeatIntervalMs)
      if (conn.ws.readyState !== WebSocket.OPEN) return
      if (Date.now() - conn.lastSeen > ctx.heartbeatTimeoutMs) {
        yield* Effect.logWarning(`session ${conn.id}: no pong for ${ctx.heartbeatTimeoutMs} ms, terminating`)
        conn.error = "heartbeat timeout"
        conn.ws.terminate()
        return
      }
      try {
        conn.ws.ping()
      } catch {
        // closing meanwhile
      }
    }
  })

type Next = "continue" | "close"

/** Reads the first frame: must be a valid Hello with our protocol version and token. */
const handshake = (conn: Connection, ctx: SessionContext) =>
  Effect.gen(function*() {
    const { ws } = conn
    const reject = (reason: Rejected["reason"], message: string) =>
      Effect.gen(function*() {
        yield* send(ws, new Rejected({ reason, message }))
        closeSocket(ws, 1008, `rejected: ${reason}`)
        yield* Effect.logWarning(`session ${conn.id}: rejected (${reason}): ${message}`)
        return Option.none<Hello>()
      })
    const first = yield* Effect.either(conn.frames.take).pipe(Effect.timeoutOption(ctx.helloTimeoutMs))
    if (Option.isNone(first)) {
      yield* Effect.logWarning(`session ${conn.id}: no Hello within ${ctx.helloTimeoutMs} ms, closing`)
      closeSocket(ws, 1008, "no Hello")
      return Option.none()
    }
    if (Either.isLeft(first.value)) return Option.none() // closed before saying anything
    const frame = first.value.right
    conn.queuedText -= frame.binary ? 0 : frame.data.byteLength
    conn.queuedBinary -= frame.binary ? frame.data.byteLength : 0
    if (frame.binary) return yield* reject("bad-hello", "the first message must be a Hello text frame")
    const text = frame.data.toString("utf8")
    const json = looseJson(text)
    if (json?._tag !== "Hello") {
      return yield* reject("bad-hello", `the first message must be a Hello (got tag ${describeTag(json)})`)
    }
    if (json.protocolVersion !== PROTOCOL_VERSION) {
      return yield* reject(
        "protocol-version",
        `daemon speaks protocol ${PROTOCOL_VERSION}, client ${String(json.protocolVersion).slice(0, 20)}`
      )
    }
    if (typeof json.token !== "string" || !tokenMatches(ctx.token, json.token)) {
      return yield* reject("token", typeof json.token === "string" ? "invalid token" : "missing token")
    }
    const decoded = decodeClientMessage(text)
    if (Either.isLeft(decoded) || decoded.right._tag !== "Hello") {
      return yield* reject("bad-hello", "malformed Hello")
    }
    return Option.some(decoded.right)
  })

// ---- ordering ------------------------------------------------------------------------------------

/** One operation of a session, as far as ordering goes. */
interface Slot {
  /** Its ordering keys (see `orderKey`); none for an operation that is refused before touching anything. */
  readonly keys: ReadonlyArray<string>
  /** Earlier operations it conflicts with that have not finished yet. */
  waiting: number
  readonly dependents: Array<Slot>
  /** Set while it waits for its turn. */
  wake: (() => void) | undefined
  /** Runnable but not started yet: counted as busy by the session (see `operations`). */
  ready: boolean
  finished: boolean
}

/**
 * The ordering key of a wire path: its normalised segments, lower-cased (and NFC-normalised) so that
 * names a case-insensitive filesystem treats as one are one key here too (conservative: more waiting,
 * never less). `""` is the root. `undefined` for a path the daemon refuses anyway.
 * Aliases through symlinks inside the root are not seen: ordering is by the paths the client names.
 */
const orderKey = (rel: string): string | undefined => {
  const normalized = normalizeRelPath(rel)
  if (Either.isLeft(normalized)) return undefined
  const key = normalized.right.join("/")
  return (/[^\x00-\x7f]/.test(key) ? key.normalize("NFC") : key).toLowerCase()
}

const keysOf = (...paths: ReadonlyArray<string>): ReadonlyArray<string> => {
  const keys: Array<string> = []
  for (const p of paths) {
    const key = orderKey(p)
    if (key !== undefined && !keys.includes(key)) keys.push(key)
  }
  return keys
}

/** Proper ancestors of a non-root key: `a/b/c` → `a`, `a/b`. */
const ancestorsOf = (key: string): Array<string> => {
  const out: Array<string> = []
  for (let i = key.indexOf("/"); i >= 0; i = key.indexOf("/", i + 1)) out.push(key.slice(0, i))
  return out
}

/**
 * Orders the operations of one session: an operation waits for every earlier, unfinished operation one of
 * whose keys is equal to, an ancestor of or a descendant of one of its keys (the root conflicts with
 * everything); all others run concurrently. Indexed so that entering and leaving cost O(depth) map
 * look-ups plus the conflicts found.
 */
const makeOrdering = (onReady: (slot: Slot) => void) => {
  const active = new Set<Slot>()
  /** key → unfinished slots with exactly that key. */
  const exact = new Map<string, Set<Slot>>()
  /** key → unfinished slots with a key strictly below it. */
  const below = new Map<string, Set<Slot>>()
  const add = (map: Map<string, Set<Slot>>, key: string, slot: Slot) => {
    const set = map.get(key)
    if (set === undefined) map.set(key, new Set([slot]))
    else set.add(slot)
  }
  const del = (map: Map<string, Set<Slot>>, key: string, slot: Slot) => {
    const set = map.get(key)
    if (set !== undefined && set.delete(slot) && set.size === 0) map.delete(key)
  }

  const enter = (keys: ReadonlyArray<string>): Slot => {
    const slot: Slot = { keys, waiting: 0, dependents: [], wake: undefined, ready: false, finished: false }
    const conflicts = new Set<Slot>()
    const collect = (set: Set<Slot> | undefined) => {
      if (set !== undefined) for (const s of set) conflicts.add(s)
    }
    for (const key of keys) {
      if (key === "") {
        collect(active)
        continue
      }
      collect(exact.get(""))
      for (const a of ancestorsOf(key)) collect(exact.get(a))
      collect(exact.get(key))
      collect(below.get(key))
    }
    for (const earlier of conflicts) {
      earlier.dependents.push(slot)
      slot.waiting++
    }
    if (keys.length > 0) {
      active.add(slot)
      for (const key of keys) {
        add(exact, key, slot)
        if (key !== "") for (const a of ancestorsOf(key)) add(below, a, slot)
      }
    }
    if (slot.waiting === 0) onReady(slot)
    return slot
  }

  const leave = (slot: Slot) => {
    if (slot.finished) return
    slot.finished = true
    if (!active.delete(slot)) return
    for (const key of slot.keys) {
      del(exact, key, slot)
      if (key !== "") for (const a of ancestorsOf(key)) del(below, a, slot)
    }
    for (const later of slot.dependents) {
      if (--later.waiting === 0) {
        onReady(later)
        const wake = later.wake
        later.wake = undefined
        wake?.()
      }
    }
  }

  return { enter, leave, active: (): Iterable<Slot> => active }
}

// ---- permits -------------------------------------------------------------------------------------

/** A FIFO counting semaphore for promises; `stop` turns every waiter (and later caller) away. */
const makePermits = (permits: number) => {
  let free = permits
  let stopped = false
  const queue = new Set<(granted: boolean) => void>()
  const acquire = (): Promise<boolean> => {
    if (stopped) return Promise.resolve(false)
    if (free > 0) {
      free--
      return Promise.resolve(true)
    }
    return new Promise((resolve) => queue.add(resolve))
  }
  /** Hands the permit straight to the next waiter, if any. */
  const release = () => {
    for (const next of queue) {
      queue.delete(next)
      return next(true)
    }
    free++
  }
  const stop = () => {
    stopped = true
    for (const next of queue) next(false)
    queue.clear()
  }
  return { acquire, release, stop }
}

// ---- fast encodings of the frequent daemon messages -------------------------------------------------

// Byte for byte what `encodeDaemonMessage` produces (tested), without validating values we made ourselves:
// Schema encoding costs ~10-40 µs per message, a noticeable share of a small file's budget.

/** `encodeDaemonMessage(new Ack({ ch, seq, count }))`. */
export const encodeAck = (ch: number, seq: number, count?: number): string =>
  count === undefined ? `{"ch":${ch},"seq":${seq},"_tag":"Ack"}` : `{"ch":${ch},"seq":${seq},"count":${count},"_tag":"Ack"}`
/** `encodeDaemonMessage(new Credit({ ch, bytes }))`. */
export const encodeCredit = (ch: number, bytes: number): string => `{"ch":${ch},"bytes":${bytes},"_tag":"Credit"}`
/** `encodeDaemonMessage(new Manifest({ ch, seq, entries, done }))` for entries built by `DestinationFs.manifestPages`. */
export const encodeManifestPage = (ch: number, seq: number, entries: ReadonlyArray<ManifestEntry>, done: boolean): string =>
  `{"ch":${ch},"seq":${seq},"entries":${JSON.stringify(entries)},"done":${done},"_tag":"Manifest"}`

const isSeq = (n: unknown): n is number => typeof n === "number" && Number.isSafeInteger(n) && n >= 0 && n <= 0xffffffff

const isMode = (mode: unknown): mode is number => typeof mode === "number" && Number.isSafeInteger(mode) && mode >= 0 && mode <= 0o7777

/** A `Write` header's or a batched file's fields as its schema checks them. */
const isFileHeader = (p: unknown, size: unknown, mode: unknown, mtime: unknown) =>
  typeof p === "string" && typeof size === "number" && Number.isSafeInteger(size) && size >= 0 && isMode(mode) && typeof mtime === "number"

/**
 * `decodeClientMessage` with a fast path for the frequent `Write`, `WriteBatch`, `Mkdir` and `Remove`
 * (an initial sync's directories, a checkout's deletions): the checks of their schemas (seq 0..2^32-1,
 * ch likewise or absent, path a string, size a non-negative integer, mode 0..0o7777, mtime a number
 * (optional in a `Mkdir`), 1 to `MAX_BATCH_FILES` files; other fields ignored) done by hand, ~20x
 * cheaper. Anything else, or a message failing them, goes through the schema.
 */
export const decodeClientMessageFast = (text: string): ReturnType<typeof decodeClientMessage> => {
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    return decodeClientMessage(text)
  }
  if (typeof json === "object" && json !== null && (json as { _tag?: unknown })._tag === "Write") {
    const { ch = 0, mode, mtime, path: p, seq, size } = json as Record<string, unknown>
    if (isSeq(ch) && isSeq(seq) && isFileHeader(p, size, mode, mtime)) {
      return Either.right(new Write({ ch, seq, path: p as string, size: size as number, mode: mode as number, mtime: mtime as number }, true))
    }
  }
  if (typeof json === "object" && json !== null && (json as { _tag?: unknown })._tag === "WriteBatch") {
    const { ch = 0, files, seq } = json as Record<string, unknown>
    if (isSeq(ch) && isSeq(seq) && Array.isArray(files) && files.length >= 1 && files.length <= MAX_BATCH_FILES) {
      const checked: Array<BatchFile> = []
      for (const file of files as Array<unknown>) {
        if (typeof file !== "object" || file === null) break
        const { mode, mtime, path: p, size } = file as Record<string, unknown>
        if (!isFileHeader(p, size, mode, mtime)) break
        checked.push({ path: p as string, size: size as number, mode: mode as number, mtime: mtime as number })
      }
      if (checked.length === files.length) return Either.right(new WriteBatch({ ch, seq, files: checked }, true))
    }
  }
  if (typeof json === "object" && json !== null && (json as { _tag?: unknown })._tag === "Mkdir") {
    const { ch = 0, mode, mtime, path: p, seq } = json as Record<string, unknown>
    if (isSeq(ch) && isSeq(seq) && typeof p === "string" && isMode(mode)) {
      if (mtime === undefined) return Either.right(new Mkdir({ ch, seq, path: p, mode }, true))
      if (typeof mtime === "number") return Either.right(new Mkdir({ ch, seq, path: p, mode, mtime }, true))
    }
  }
  if (typeof json === "object" && json !== null && (json as { _tag?: unknown })._tag === "Remove") {
    const { ch = 0, path: p, seq } = json as Record<string, unknown>
    if (isSeq(ch) && isSeq(seq) && typeof p === "string") return Either.right(new Remove({ ch, seq, path: p }, true))
  }
  return decodeClientMessage(text)
}

// ---- operations ----------------------------------------------------------------------------------

/** A `Write` (or a `WriteBatch`, as the write of its files' bytes one after the other) from its header to its reply. */
interface PendingWrite {
  readonly seq: number
  readonly path: string
  /** A batch's files, file `i` being operation `seq + i`. */
  readonly files: ReadonlyArray<BatchFile> | undefined
  /** A batch whose files are written in order, one at a time. */
  readonly oneByOne: boolean
  readonly size: number
  readonly mode: number
  readonly mtime: number
  readonly slot: Slot
  /** Chunk bytes received so far (never more than `size`). */
  received: number
  /** Received and neither written nor credited yet. */
  readonly chunks: Array<Buffer>
  buffered: number
  /** Set by the frame loop (Abort, bad chunk, end of session): the write stops, removes its temp file and replies so. */
  failure: WriteFailure | undefined
  /** Set while the write waits for chunks. */
  wake: (() => void) | undefined
}

interface WriteFailure {
  readonly code: OpErrorCode
  readonly message: string
}

const wakeUp = (holder: { wake: (() => void) | undefined }) => {
  const wake = holder.wake
  holder.wake = undefined
  wake?.()
}

/** `work` gave up: the session is being torn down. */
const STOPPED = Symbol("stopped")

/**
 * Applies the operations of one authenticated session until it closes.
 *
 * Frames are read in order by this fiber; each operation then runs on its own, concurrently with the
 * others but never before an earlier operation on the same path, an ancestor or a descendant of it
 * (`makeOrdering`): the outcome is the one of applying them in order, while unrelated files are written
 * side by side. At most `CONCURRENCY` operations are in a filesystem call at once. Replies (`Ack`,
 * `OpFailed`) go out in completion order, each naming its seq.
 *
 * Chunks are appended to their write as they arrive and credited once on disk; a write whose bytes have
 * all arrived by the time it may start is done in one go (`DestinationFs.writeFile`). Bytes held for a
 * write that cannot start yet stay counted against the client's window (`queuedBinary`), so memory stays
 * bounded by it. A client must therefore send the chunks of a write before those of a later write that
 * conflicts with it (the same path, an ancestor, a descendant): the later one waits for the earlier.
 *
 * Frames stop being read once `MAX_PENDING` operations are unfinished, for as long as some of them can
 * progress without more frames; a write waiting for its chunks never holds up the frames it waits for.
 *
 * The operations themselves are plain promise chains, one `DestinationFs` call per filesystem step:
 * with a fiber, an Effect semaphore and scopes per operation, the daemon spent ~200 µs of CPU per small
 * file on them alone (measured), more than the filesystem work. They are owned by this session's scope
 * all the same: its finalizer stops them (no new filesystem step starts, writes not committed remove
 * their temp files) and waits until all are done.
 * When the client simply leaves, what arrived in full is still applied first, as when operations ran
 * one by one.
 */
const operations = (chan: Channel, ctx: SessionContext, root: string) =>
  Effect.gen(function*() {
    const { fsApi } = ctx
    const { ch, ws } = chan
    const runtime = yield* Effect.runtime<never>()
    const runExit = Runtime.runPromiseExit(runtime)
    const runSync = Runtime.runSync(runtime)
    const warnNow = (message: string) => runSync(Effect.logWarning(`session ${chan.id}: ${message}`))

    const permits = makePermits(CONCURRENCY)
    /** Writes by seq, from header to reply; one the frame loop gave up on leaves early (see `failWrite`). */
    const writes = new Map<number, PendingWrite>()
    /** Every write whose chain has not finished (to wake on teardown). */
    const live = new Set<PendingWrite>()
    /** Seqs already answered with OpFailed whose late chunks are dropped silently (insertion-ordered, bounded). */
    const failed = new Set<number>()
    const markFailed = (seq: number) => {
      failed.delete(seq)
      failed.add(seq)
      if (failed.size > MAX_REMEMBERED_FAILED) failed.delete(failed.values().next().value!)
    }
    /** Set by the finalizer: nothing new starts, waiting operations give up. */
    let stopping = false

    /** Operations dispatched and not finished. */
    let unfinished = 0
    /** Operations that can progress without another frame: runnable but not started, or in `work`. */
    let busy = 0
    let roomWaiter: (() => void) | undefined
    const drainWaiters = new Set<() => void>()
    const notify = () => {
      const waiter = roomWaiter
      roomWaiter = undefined
      waiter?.()
      if (unfinished === 0) {
        for (const resolve of drainWaiters) resolve()
        drainWaiters.clear()
      }
    }
    const ordering = makeOrdering((slot) => {
      slot.ready = true
      busy++
    })
    /** The operation has started: no longer counted as runnable (`work` counts it again). */
    const started = (slot: Slot) => {
      if (slot.ready) {
        slot.ready = false
        busy--
        notify()
      }
    }
    /** Resolves once every earlier conflicting operation has finished, or `giveUp` (or teardown) says so. */
    const turn = async (slot: Slot, giveUp: () => boolean = () => false) => {
      while (slot.waiting > 0 && !giveUp() && !stopping) await new Promise<void>((resolve) => (slot.wake = resolve))
    }

    const hasRoom = () => unfinished < MAX_PENDING || busy === 0
    /** Waits, before a new operation is taken on, while enough are unfinished and some can progress. */
    const room: Effect.Effect<void> = Effect.suspend(() =>
      hasRoom()
        ? Effect.void
        : Effect.zipRight(
          Effect.async<void>((resume) => {
            roomWaiter = () => resume(Effect.void)
            return Effect.sync(() => {
              roomWaiter = undefined
            })
          }),
          room
        )
    )
    /** Completes once no operation is unfinished. */
    const drain = Effect.async<void>((resume) => {
      if (unfinished === 0) return resume(Effect.void)
      const resolve = () => resume(Effect.void)
      drainWaiters.add(resolve)
      return Effect.sync(() => drainWaiters.delete(resolve))
    })

    /** Counts `f` as progress that needs no frame while it runs. */
    const busyWhile = async <A>(f: () => Promise<A>): Promise<A> => {
      busy++
      try {
        return await f()
      } finally {
        busy--
        notify()
      }
    }
    /** A filesystem step under a permit; `STOPPED` when the session is torn down first. */
    const work = <A>(f: () => Promise<A>): Promise<A | typeof STOPPED> =>
      busyWhile(async () => {
        if (!(await permits.acquire())) return STOPPED
        try {
          return stopping ? STOPPED : await f()
        } finally {
          permits.release()
        }
      })
    /** Runs one `DestinationFs` effect: its typed error comes back as a `Left`, a defect rejects. */
    const fsCall = <A, E>(effect: Effect.Effect<A, E>): Promise<Either.Either<A, E>> =>
      runExit(effect).then((exit) => {
        if (Exit.isSuccess(exit)) return Either.right(exit.value)
        const failure = Cause.failureOption(exit.cause)
        if (Option.isSome(failure)) return Either.left(failure.value)
        throw new Error(Cause.pretty(exit.cause))
      })

    // What goes out during one turn of the event loop (Credits, Acks) leaves in one socket write: ws writes
    // each frame at once otherwise, and over loopback each write is a costly syscall. Credits are summed
    // and sent before any reply, so a write's last Credit precedes its Ack.
    const socket = (ws as unknown as { readonly _socket?: { cork?: () => void; uncork?: () => void } })._socket
    let corked = false
    let flushScheduled = false
    let creditPending = 0
    const flushCredit = () => {
      if (creditPending > 0) {
        post(encodeCredit(ch, creditPending))
        creditPending = 0
      }
    }
    const flush = () => {
      flushScheduled = false
      flushCredit()
      if (corked) {
        corked = false
        socket?.uncork?.()
      }
    }
    const post = (text: string) => {
      if (ws.readyState !== WebSocket.OPEN) return
      if (!corked && typeof socket?.cork === "function" && typeof socket.uncork === "function") {
        socket.cork()
        corked = true
        scheduleFlush()
      }
      ws.send(text)
    }
    const scheduleFlush = () => {
      if (!flushScheduled) {
        flushScheduled = true
        setImmediate(flush)
      }
    }
    /** Returns window: `bytes` of chunk payload held here are on disk (or dropped). */
    const release = (bytes: number) => {
      if (bytes <= 0) return
      chan.queuedBinary -= bytes
      creditPending += bytes
      scheduleFlush()
    }
    /** Credits bytes that were never held (dropped as they came). */
    const creditNow = (bytes: number) => {
      chan.queuedBinary += bytes
      release(bytes)
    }
    const ack = (seq: number, count?: number) => {
      flushCredit()
      post(encodeAck(ch, seq, count))
    }
    const opFailed = (seq: number, code: OpErrorCode, message: string, count?: number) => {
      flushCredit()
      post(encodeDaemonMessage(new OpFailed({ ch, seq, code, message, ...(count === undefined ? {} : { count }) })))
    }
    const failNow = (seq: number, code: OpErrorCode, message: string, count?: number) => {
      markFailed(seq)
      opFailed(seq, code, message, count)
    }
    const replyWith = (seq: number, result: Either.Either<unknown, DestinationError>, what = "op") => {
      if (Either.isRight(result)) return ack(seq)
      if (result.left._tag === "ConfinementError") warnNow(`${what} ${seq} refused: ${result.left.message}`)
      opFailed(seq, errorCode(result.left), result.left.message)
    }

    const protocolClose = (message: string): Next => {
      warnNow(`${message}; closing session`)
      closeSocket(ws, 1002, message.slice(0, 120))
      return "close"
    }

    /** Starts `body` once it was counted; its slot is left when it settles, whatever happens. */
    const dispatch = (slot: Slot, body: () => Promise<void>) => {
      unfinished++
      body()
        .catch((defect: unknown) => {
          runSync(Effect.logError(`session ${chan.id}: operation failed: ${String(defect).split("\n")[0]}`))
          chan.ws.terminate()
        })
        .finally(() => {
          if (slot.ready) {
            slot.ready = false
            busy--
          }
          ordering.leave(slot)
          unfinished--
          notify()
        })
    }

    /** An operation that is one filesystem call and a reply. */
    const simple = (seq: number, keys: ReadonlyArray<string>, op: () => Promise<Either.Either<void, DestinationError>>) => {
      const slot = ordering.enter(keys)
      dispatch(slot, async () => {
        await turn(slot)
        started(slot)
        const result = await work(op)
        if (result !== STOPPED) replyWith(seq, result)
      })
    }
    const settled = (done: Promise<void>) =>
      done.then(() => Either.right(undefined), (error: DestinationError) => Either.left(error))

    /** The frame loop gives up on a write that is not complete: its chain cleans up and replies. */
    const failWrite = (w: PendingWrite, code: OpErrorCode, message: string) => {
      if (writes.get(w.seq) === w) writes.delete(w.seq)
      markFailed(w.seq)
      w.failure ??= { code, message }
      wakeUp(w)
      wakeUp(w.slot)
    }

    const takeChunks = (w: PendingWrite) => {
      const chunks = w.chunks.splice(0)
      const bytes = w.buffered
      w.buffered = 0
      return { chunks, bytes }
    }

    const aborted: WriteFailure = { code: "aborted", message: "the session ended before the write was applied" }

    /** Streams a write that could start before all its bytes were here: temp file, chunks as they come, commit. */
    const streamWrite = async (w: PendingWrite): Promise<Either.Either<void, DestinationError | WriteFailure>> => {
      const scope = runSync(Scope.make())
      try {
        const opened = await work(() => fsCall(Scope.extend(fsApi.openWrite(root, w.path, w.mode), scope)))
        if (opened === STOPPED) return Either.left(aborted)
        if (Either.isLeft(opened)) return opened
        const handle = opened.right
        let written = 0
        while (written < w.size) {
          if (w.failure !== undefined) return Either.left(w.failure)
          if (stopping) return Either.left(aborted)
          if (w.chunks.length === 0) {
            await new Promise<void>((resolve) => (w.wake = resolve))
            continue
          }
          const { bytes, chunks } = takeChunks(w)
          const result = await work(() => fsCall(handle.writeChunks(chunks))).finally(() => release(bytes))
          if (result === STOPPED) return Either.left(aborted)
          if (Either.isLeft(result)) return result
          written += bytes
        }
        const committed = await work(() => fsCall(handle.commit(w.mode, w.mtime)))
        return committed === STOPPED ? Either.left(aborted) : committed
      } finally {
        // removes the temp file unless it was committed
        await runExit(Scope.close(scope, Exit.void))
      }
    }

    /**
     * A batch: once all its bytes are here (they follow its header at once), every file is written side by
     * side, each as a whole write; one Ack for all, or a reply per file if some failed.
     */
    const runBatch = async (w: PendingWrite, files: ReadonlyArray<BatchFile>) => {
      let results: Array<DestinationError | WriteFailure | undefined> | WriteFailure
      try {
        await turn(w.slot, () => w.failure !== undefined)
        started(w.slot)
        while (w.received < w.size && w.failure === undefined && !stopping) {
          await new Promise<void>((resolve) => (w.wake = resolve))
        }
        if (w.failure !== undefined) results = w.failure
        else if (stopping) results = aborted
        else {
          const { bytes, chunks } = takeChunks(w)
          const data = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks)
          let offset = 0
          const writeOne = (file: BatchFile) => {
            const content = data.subarray(offset, (offset += file.size))
            return work(() =>
              fsApi.writeFile(root, file.path, content.byteLength > 0 ? [content] : [], file.mode, file.mtime).then(
                () => undefined,
                (error: DestinationError) => error
              )
            ).then((done) => (done === STOPPED ? aborted : done))
          }
          const inOrder = async () => {
            const out: Array<DestinationError | WriteFailure | undefined> = []
            for (const file of files) out.push(await writeOne(file))
            return out
          }
          results = await (w.oneByOne ? inOrder() : Promise.all(files.map(writeOne))).finally(() => release(bytes))
        }
      } finally {
        live.delete(w)
        if (writes.get(w.seq) === w) writes.delete(w.seq)
        release(takeChunks(w).bytes)
      }
      if (!Array.isArray(results)) {
        markFailed(w.seq)
        return opFailed(w.seq, results.code, results.message, files.length)
      }
      if (results.every((r) => r === undefined)) return ack(w.seq, files.length)
      results.forEach((error, i) => {
        const seq = w.seq + i
        if (error === undefined) ack(seq)
        else if ("_tag" in error) replyWith(seq, Either.left(error), "write")
        else opFailed(seq, error.code, error.message)
      })
    }

    const runWrite = async (w: PendingWrite) => {
      if (w.files !== undefined) return runBatch(w, w.files)
      let result: Either.Either<void, DestinationError | WriteFailure>
      try {
        await turn(w.slot, () => w.failure !== undefined)
        started(w.slot)
        if (w.received < w.size && w.size <= GRACE_BYTES) {
          // the rest is usually in the very next frames: a turn of the event loop for it spares a streamed write
          let waited = false
          const timer = setImmediate(() => {
            waited = true
            wakeUp(w)
          })
          while (w.received < w.size && !waited && w.failure === undefined && !stopping) {
            await new Promise<void>((resolve) => (w.wake = resolve))
          }
          clearImmediate(timer)
        }
        if (w.failure !== undefined) {
          result = Either.left(w.failure)
        } else if (stopping) {
          result = Either.left(aborted)
        } else if (w.received === w.size) {
          // every byte is here already (small files, usually): temp file to rename in one go
          const { bytes, chunks } = takeChunks(w)
          const done = await work(() =>
            fsApi.writeFile(root, w.path, chunks, w.mode, w.mtime).then(
              () => Either.right(undefined),
              (error: DestinationError) => Either.left(error)
            )
          ).finally(() => release(bytes))
          result = done === STOPPED ? Either.left(aborted) : done
        } else {
          result = await streamWrite(w)
        }
      } finally {
        live.delete(w)
        if (writes.get(w.seq) === w) writes.delete(w.seq)
        release(takeChunks(w).bytes)
      }
      if (Either.isRight(result)) return ack(w.seq)
      markFailed(w.seq)
      const error = result.left
      if ("_tag" in error) return replyWith(w.seq, Either.left(error), "write")
      opFailed(w.seq, error.code, error.message)
    }

    /** Sends the manifest in pages, each once the next is known (so the last one says `done`), then the Ack. */
    const listManifest = (seq: number) =>
      Effect.gen(function*() {
        let previous: ReadonlyArray<ManifestEntry> | undefined
        const walked = yield* Effect.either(
          fsApi.manifestPages(root, MANIFEST_PAGE).pipe(
            Stream.runForEach((page) =>
              Effect.suspend(() => {
                const pending = previous
                previous = page
                return pending === undefined ? Effect.void : sendAwait(ws, encodeManifestPage(ch, seq, pending, false))
              })
            )
          )
        )
        if (Either.isLeft(walked)) return opFailed(seq, "io", walked.left.message)
        yield* sendAwait(ws, encodeManifestPage(ch, seq, previous ?? [], true))
        ack(seq)
      })

    /** Takes a write (or batch) from its header on: it runs once its turn comes and its bytes are here. */
    const startWrite = (
      header: Pick<PendingWrite, "seq" | "path" | "files" | "oneByOne" | "size" | "mode" | "mtime">,
      keys: ReadonlyArray<string>
    ) => {
      const w: PendingWrite = {
        ...header,
        slot: ordering.enter(keys),
        received: 0,
        chunks: [],
        buffered: 0,
        failure: undefined,
        wake: undefined
      }
      writes.set(w.seq, w)
      live.add(w)
      dispatch(w.slot, () => runWrite(w))
    }

    const startOperation = (message: Operation) => {
      const { seq } = message
      const isWrite = message._tag === "Write" || message._tag === "WriteBatch"
      const count = message._tag === "WriteBatch" ? message.files.length : undefined
      if (unfinished >= MAX_UNFINISHED || (isWrite && writes.size >= MAX_OPEN_WRITES)) {
        const why = isWrite && writes.size >= MAX_OPEN_WRITES
          ? `more than ${MAX_OPEN_WRITES} concurrent writes`
          : `more than ${MAX_UNFINISHED} operations waiting on unfinished writes`
        warnNow(`op ${seq} refused: ${why} (unfinished ${unfinished}, runnable ${busy}, open writes ${writes.size}, waiting for bytes ${[...writes.values()].filter((w) => w.received < w.size).length})`)
        return failNow(seq, "protocol", why, count)
      }
      switch (message._tag) {
        case "WriteBatch": {
          const checked = checkBatch(message)
          if (typeof checked === "string") {
            warnNow(`batch ${seq} refused: ${checked}`)
            return failNow(seq, "protocol", checked, count)
          }
          const { files } = message
          return startWrite({ seq, path: files[0]!.path, files, oneByOne: checked.oneByOne, size: checked.size, mode: 0, mtime: 0 }, checked.keys)
        }
        case "Write": {
          const { mode, mtime, path: p, size } = message
          return startWrite({ seq, path: p, files: undefined, oneByOne: false, size, mode, mtime }, keysOf(p))
        }
        case "Mkdir":
          return simple(seq, keysOf(message.path), () => settled(fsApi.mkdirNow(root, message.path, message.mode, message.mtime)))
        case "Remove":
          return simple(seq, keysOf(message.path), () => settled(fsApi.removeNow(root, message.path)))
        case "Rename":
          return simple(seq, keysOf(message.from, message.to), () => fsCall(fsApi.rename(root, message.from, message.to)))
        case "Symlink":
          return simple(seq, keysOf(message.path), () => fsCall(fsApi.symlink(root, message.path, message.target, message.mtime)))
        case "ListManifest": {
          // the whole tree: after every earlier operation, before every later one
          const slot = ordering.enter([""])
          return dispatch(slot, async () => {
            await turn(slot)
            started(slot)
            if (stopping) return
            const exit = await busyWhile(() => runExit(listManifest(seq)))
            if (Exit.isFailure(exit) && !Cause.isInterruptedOnly(exit.cause)) throw new Error(Cause.pretty(exit.cause))
          })
        }
      }
    }

    type Handled = Next | { readonly start: Operation }

    const onText = ({ decoded, text }: TextFrame): Handled => {
      if (Either.isLeft(decoded)) {
        const json = looseJson(text)
        const seq = looseSeq(json)
        if (json === undefined) return protocolClose("invalid JSON text frame")
        if (seq === undefined) return protocolClose(`invalid message (tag ${describeTag(json)})`)
        const why = `invalid or unknown message (tag ${describeTag(json)})`
        warnNow(`op ${seq}: ${why}`)
        const open = writes.get(seq)
        if (open !== undefined && open.received < open.size) failWrite(open, "protocol", why)
        else failNow(seq, "protocol", why, looseCount(json))
        return "continue"
      }
      const message = decoded.right
      if (message._tag === "Hello" || message._tag === "Open" || message._tag === "Close") {
        return protocolClose(`${message._tag} routed to a channel`) // the session handles these
      }
      if (message._tag === "Abort") {
        const open = writes.get(message.seq)
        // once every byte has arrived the write goes through: it may well be on disk already
        if (open !== undefined && open.received < open.size) failWrite(open, "aborted", "write aborted by the client")
        return "continue"
      }
      if (message._tag === "Write" || message._tag === "WriteBatch") {
        failed.delete(message.seq)
        if (writes.has(message.seq)) return protocolClose(`${message._tag} ${message.seq} while a Write with that seq is open`)
      }
      return { start: message }
    }

    const onBinary = (data: Buffer): Next => {
      const chunk = decodeChunk(data)
      if (chunk === undefined) return protocolClose(`binary frame shorter than its ${CHUNK_HEADER_BYTES}-byte header`)
      const { payload, seq } = chunk
      const w = writes.get(seq)
      if (w === undefined || w.received === w.size) {
        creditNow(payload.byteLength)
        // late chunks of a write already answered with OpFailed are dropped silently
        if (w === undefined && failed.has(seq)) return "continue"
        warnNow(`chunk for unknown seq ${seq}`)
        failNow(seq, "protocol", `chunk for seq ${seq}, which has no open Write`)
        return "continue"
      }
      if (payload.byteLength > w.size - w.received) {
        creditNow(payload.byteLength)
        warnNow(`write ${seq}: more bytes than its size ${w.size}`)
        failWrite(w, "protocol", `more chunk bytes than the announced size ${w.size}`)
        return "continue"
      }
      w.received += payload.byteLength
      if (payload.byteLength > 0) {
        // held until written: counted against the window like bytes still queued
        chan.queuedBinary += payload.byteLength
        w.chunks.push(payload)
        w.buffered += payload.byteLength
      }
      wakeUp(w)
      return "continue"
    }

    /** Teardown: no new filesystem step, waiting operations give up, temp files go; then wait for all. */
    const stop = Effect.sync(() => {
      stopping = true
      for (const w of live) failWrite(w, "aborted", aborted.message)
      for (const slot of ordering.active()) wakeUp(slot)
      permits.stop()
    })
    yield* Effect.addFinalizer(() => Effect.zipRight(stop, drain))

    // Frames are taken in batches and handled synchronously; only a lack of room makes the loop wait.
    while (true) {
      const [frames, done] = yield* chan.frames.takeAll
      for (const frame of frames) {
        if (frame.binary) chan.queuedBinary -= frame.data.byteLength
        else chan.queuedText -= frame.bytes
        const handled = frame.binary ? onBinary(frame.data) : onText(frame)
        if (handled === "close") return
        if (handled !== "continue") {
          if (!hasRoom()) yield* room
          else if (unfinished >= MAX_PENDING) {
            // Nothing counts as runnable, but operations woken by this very batch (a write whose last
            // chunk just came) only run once the loop yields: let them, before taking on more.
            yield* Effect.yieldNow()
            if (!hasRoom()) yield* room
          }
          startOperation(handled.start)
        }
      }
      if (done) break
    }
    // no more frames: writes still missing bytes can never complete; what arrived in full is applied
    for (const w of [...writes.values()]) {
      if (w.received < w.size) failWrite(w, "aborted", "the session ended before the write was complete")
    }
    yield* drain
    flushCredit()
  })

/** A defect is logged and cuts the client off (its other channels with it); an interruption is the daemon stopping. */
const cutOffOnDefect = (id: string, ws: WebSocket) =>
  Effect.catchAllCause((cause: Cause.Cause<never>) =>
    Cause.isInterruptedOnly(cause)
      ? Effect.void
      : Effect.zipRight(
        Effect.logError(`session ${id}: failed: ${Cause.pretty(cause).split("\n")[0]}`),
        Effect.sync(() => ws.terminate())
      )
  )

/** Opens a channel's root and applies its operations until it closes; `Closed` tells the client it is done. */
const channel = (conn: Connection, chan: Channel, open: Open, ctx: SessionContext) =>
  Effect.gen(function*() {
    const { ch, ws } = chan
    const root = yield* Effect.either(ctx.fsApi.resolveRoot(open.destinationRoot))
    if (Either.isLeft(root)) {
      conn.channels.delete(ch)
      yield* send(ws, new OpenFailed({ ch, message: root.left.message }))
      return yield* Effect.logWarning(
        `session ${chan.id}: cannot open ${JSON.stringify(open.destinationRoot)} (project ${JSON.stringify(open.project)}): ${root.left.message}`
      )
    }
    yield* send(ws, new Opened({ ch, root: root.right }))
    yield* Effect.logInfo(`session ${chan.id}: opened (project ${JSON.stringify(open.project)}, root ${root.right})`)
    yield* Effect.scoped(operations(chan, ctx, root.right))
    yield* send(ws, new Closed({ ch }))
    yield* Effect.logInfo(`session ${chan.id}: closed`)
  }).pipe(
    Effect.ensuring(Effect.sync(() => conn.channels.get(chan.ch) === chan && conn.channels.delete(chan.ch))),
    cutOffOnDefect(chan.id, conn.ws)
  )

type Routed = Next | { readonly open: Open }

/**
 * Routes the frames of an authenticated session to their channels, in order, and opens and closes
 * channels; when the session ends every channel applies what reached it in full, then it returns.
 */
const channels = (conn: Connection, ctx: SessionContext) =>
  Effect.gen(function*() {
    const runSync = Runtime.runSync(yield* Effect.runtime<never>())
    const running = yield* FiberSet.make()
    const protocolClose = (message: string): Next => {
      runSync(Effect.logWarning(`session ${conn.id}: ${message}; closing session`))
      closeSocket(conn.ws, 1002, message.slice(0, 120))
      return "close"
    }
    const deliver = (ch: number, frame: ChannelFrame): Routed => {
      const chan = conn.channels.get(ch)
      if (chan === undefined) return protocolClose(`message on channel ${ch}, which is not open`)
      if (frame.binary) chan.queuedBinary += frame.data.byteLength
      else chan.queuedText += frame.bytes
      if (chan.queuedBinary > MAX_QUEUED_BINARY || chan.queuedText > MAX_QUEUED_TEXT) {
        conn.error = `client exceeded the flow-control window of channel ${ch}`
        closeSocket(conn.ws, 1008, "flow-control window exceeded")
        return "close"
      }
      if (!chan.frames.unsafeOffer(frame)) return protocolClose(`message on channel ${ch} after its Close`)
      return "continue"
    }
    const route = (frame: Frame): Routed => {
      if (frame.binary) {
        if (frame.data.byteLength < CHUNK_HEADER_BYTES) {
          return protocolClose(`binary frame shorter than its ${CHUNK_HEADER_BYTES}-byte header`)
        }
        return deliver(frame.data.readUInt32BE(0), { binary: true, data: frame.data })
      }
      const text = frame.data.toString("utf8")
      const decoded = decodeClientMessageFast(text)
      let ch: unknown
      if (Either.isRight(decoded)) {
        const message = decoded.right
        switch (message._tag) {
          case "Hello":
            return protocolClose("Hello after the handshake")
          case "Open":
            if (conn.channels.has(message.ch)) return protocolClose(`Open of channel ${message.ch}, which is open`)
            if (conn.channels.size >= MAX_CHANNELS) return protocolClose(`more than ${MAX_CHANNELS} channels`)
            return { open: message }
          case "Close": {
            const chan = conn.channels.get(message.ch)
            // closing a channel that is not open (its Open failed, say) is already done
            if (chan === undefined) sendText(conn.ws, encodeDaemonMessage(new Closed({ ch: message.ch })))
            else chan.frames.unsafeDone(Exit.void)
            return "continue"
          }
        }
        ch = message.ch
      } else {
        // the channel answers for a message it cannot read, if the message says which channel it is
        const json = looseJson(text)
        if (json === undefined) return protocolClose("invalid JSON text frame")
        ch = json.ch ?? 0
        if (!isSeq(ch)) return protocolClose(`invalid channel in a message (tag ${describeTag(json)})`)
      }
      return deliver(ch as number, { binary: false, bytes: frame.data.byteLength, text, decoded })
    }
    const endChannels = Effect.sync(() => {
      for (const chan of conn.channels.values()) chan.frames.unsafeDone(Exit.void)
    })
    yield* Effect.addFinalizer(() => endChannels)

    route: while (true) {
      const [frames, done] = yield* conn.frames.takeAll
      for (const frame of frames) {
        if (frame.binary) conn.queuedBinary -= frame.data.byteLength
        else conn.queuedText -= frame.data.byteLength
        const routed = route(frame)
        if (routed === "close") break route
        if (routed !== "continue") {
          const { ch } = routed.open
          const chan: Channel = {
            ch,
            id: `${conn.id}/${ch}`,
            ws: conn.ws,
            frames: yield* Mailbox.make<ChannelFrame>(),
            queuedBinary: 0,
            queuedText: 0
          }
          conn.channels.set(ch, chan)
          yield* FiberSet.run(running, channel(conn, chan, routed.open, ctx))
        }
      }
      if (done) break
    }
    yield* endChannels
    yield* FiberSet.awaitEmpty(running)
  })

const session = (conn: Connection, ctx: SessionContext) =>
  Effect.gen(function*() {
    yield* Effect.addFinalizer(() => Effect.sync(() => closeSocket(conn.ws, 1001, "session ended")))
    yield* Effect.forkScoped(heartbeat(conn, ctx))
    const hello = yield* handshake(conn, ctx)
    if (Option.isNone(hello)) return
    yield* Effect.acquireRelease(
      SubscriptionRef.update(ctx.clients, (n) => n + 1),
      () => SubscriptionRef.update(ctx.clients, (n) => n - 1)
    )
    yield* send(conn.ws, new Welcome({ protocolVersion: PROTOCOL_VERSION, daemonVersion: VERSION, sessionId: conn.id }))
    yield* Effect.logInfo(`session ${conn.id}: opened (client ${JSON.stringify(hello.value.clientId)})`)
    yield* channels(conn, ctx)
    const how = conn.closeCode === undefined ? "ended" : `closed (code ${conn.closeCode}${conn.error ? `: ${conn.error}` : ""})`
    if (conn.error !== undefined) yield* Effect.logWarning(`session ${conn.id}: ${how}`)
    else yield* Effect.logInfo(`session ${conn.id}: ${how}`)
  }).pipe(
    Effect.scoped,
    cutOffOnDefect(conn.id, conn.ws)
  )

/** Completes when no authenticated session has existed for `graceMs` (also right after start). */
const idle = (clients: SubscriptionRef.SubscriptionRef<number>, graceMs: number) => {
  const until = (p: (n: number) => boolean) => clients.changes.pipe(Stream.filter(p), Stream.take(1), Stream.runDrain)
  const round = Effect.zipRight(
    until((n) => n === 0),
    Effect.raceFirst(Effect.as(Effect.sleep(graceMs), true), Effect.as(until((n) => n > 0), false))
  )
  return Effect.repeat(round, { until: (isIdle) => isIdle })
}

// ---- the program --------------------------------------------------------------------------------

/**
 * Runs the daemon until it has been idle for `graceMs` (or SIGINT/SIGTERM with `handleSignals`).
 * Fails with `DaemonAlreadyRunning` when another daemon of this user holds the lock.
 */
export const runDaemon = (
  options: DaemonOptions
): Effect.Effect<void, DaemonAlreadyRunning | DaemonStartError, DestinationFs> => {
  const home = options.home ?? os.homedir()
  const paths = daemonPaths(home)
  let signalled = false
  const signal = (s: ReadySignal) =>
    options.readyFd === undefined || signalled
      ? Effect.void
      : Effect.zipRight(Effect.sync(() => (signalled = true)), writeReadySignal(options.readyFd, s))

  const main = Effect.gen(function*() {
    const fsApi = yield* DestinationFs
    yield* ensureStateDir(paths.dir)
    yield* Effect.acquireRelease(takeLock(paths.lockPath), () => releaseLock(paths.lockPath))
    const wss = yield* listen(options.port)
    const port = (wss.address() as AddressInfo).port

    const token = randomHex(32)
    const clients = yield* SubscriptionRef.make(0)
    const shutdown = yield* Deferred.make<void>()
    const ctx: SessionContext = {
      token: Buffer.from(token, "utf8"),
      fsApi,
      clients,
      heartbeatIntervalMs: options.heartbeatIntervalMs ?? 2_000,
      heartbeatTimeoutMs: options.heartbeatTimeoutMs ?? 6_000,
      helloTimeoutMs: options.helloTimeoutMs ?? 10_000
    }

    const sessions = yield* FiberSet.make()
    const run = yield* FiberSet.runtime(sessions)<never>()
    const runSync = Runtime.runSync(yield* Effect.runtime<never>())
    wss.on("error", (e) => runSync(Effect.logError(`server error: ${e.message}`)))
    const onConnection = (ws: WebSocket) => {
      const conn: Connection = {
        id: randomHex(4),
        ws,
        frames: runSync(Mailbox.make<Frame>()),
        channels: new Map(),
        lastSeen: Date.now(),
        queuedBinary: 0,
        queuedText: 0,
        overflow: false,
        closeCode: undefined,
        error: undefined
      }
      // frames are queued synchronously here and consumed by the one session fiber, in order
      ws.on("message", (raw, isBinary) => {
        conn.lastSeen = Date.now()
        if (conn.overflow) return
        const data = toBuffer(raw)
        if (isBinary) conn.queuedBinary += data.byteLength
        else conn.queuedText += data.byteLength
        if (conn.queuedBinary > MAX_UNROUTED || conn.queuedText > MAX_QUEUED_TEXT) {
          conn.overflow = true
          conn.error = "client exceeded the flow-control window"
          closeSocket(ws, 1008, "flow-control window exceeded")
          return
        }
        conn.frames.unsafeOffer({ binary: isBinary, data })
      })
      ws.on("pong", () => {
        conn.lastSeen = Date.now()
      })
      ws.on("error", (e) => {
        conn.error = e.message
        conn.closeCode ??= receiverCloseCode(e)
      })
      ws.on("close", (code) => {
        conn.closeCode ??= code
        conn.frames.unsafeDone(Exit.void)
      })
      run(session(conn, ctx))
    }
    yield* Effect.acquireRelease(
      Effect.sync(() => wss.on("connection", onConnection)),
      () => Effect.sync(() => wss.off("connection", onConnection))
    )

    if (options.handleSignals) {
      yield* Effect.acquireRelease(
        Effect.sync(() => {
          const handler = () => Deferred.unsafeDone(shutdown, Exit.void)
          process.on("SIGINT", handler)
          process.on("SIGTERM", handler)
          return handler
        }),
        (handler) =>
          Effect.sync(() => {
            process.off("SIGINT", handler)
            process.off("SIGTERM", handler)
          })
      )
    }

    yield* writeState(paths.statePath, {
      port,
      pid: process.pid,
      version: VERSION,
      protocolVersion: PROTOCOL_VERSION,
      token
    })
    yield* Effect.logInfo(`sicksync daemon ${VERSION} listening on 127.0.0.1:${port} (pid ${process.pid})`)
    yield* signal({ _tag: "Ready", port, pid: process.pid, version: VERSION, protocolVersion: PROTOCOL_VERSION })

    const reason = yield* Effect.raceFirst(
      Effect.as(idle(clients, options.graceMs), `no clients for ${options.graceMs} ms`),
      Effect.as(Deferred.await(shutdown), "signal received")
    )
    yield* Effect.logInfo(`shutting down: ${reason}`)
  }).pipe(Effect.scoped)

  return main.pipe(
    Effect.tapError((e) =>
      signal(e._tag === "DaemonAlreadyRunning" ? { _tag: "AlreadyRunning", pid: e.pid } : { _tag: "Failed", message: e.message })
    ),
    Effect.tapDefect((defect) => signal({ _tag: "Failed", message: String(defect) })),
    Effect.onInterrupt(() => signal({ _tag: "Failed", message: "interrupted" }))
  )
}

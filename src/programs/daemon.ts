/**
 * The remote daemon (`sicksync daemon`): a WebSocket server on 127.0.0.1 serving many sessions at once,
 * one per (client, destination). See DESIGN §3/§4 and `schemas/Protocol.ts`.
 *
 * Lifecycle: ~/.sicksync (0700) → lock (O_EXCL, pid) → listen → daemon.json (0600, atomic) → ready signal
 * on `--ready-fd` → serve until no authenticated session for `graceMs` (or SIGINT/SIGTERM) → finalizers
 * remove daemon.json, close the server and drop the lock, in that order.
 */
import {
  Cause,
  Chunk,
  Data,
  Deferred,
  Effect,
  Either,
  ExecutionStrategy,
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
  Ack,
  Credit,
  type DaemonMessage,
  type DaemonState,
  DaemonState as DaemonStateSchema,
  decodeChunk,
  decodeClientMessage,
  encodeDaemonMessage,
  type Hello,
  Manifest,
  type ManifestEntry,
  MAX_FRAME_BYTES,
  OpFailed,
  type OpErrorCode,
  PROTOCOL_VERSION,
  Rejected,
  Welcome,
  WINDOW_BYTES
} from "../schemas/Protocol.js"
import { type DestinationError, DestinationFs, type DestinationFsApi, type WriteHandle } from "../services/DestinationFs.js"
import { VERSION } from "../version.js"

export const DEFAULT_PORT = 8675
export const DEFAULT_GRACE_MS = 30_000

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

/** Per-connection state shared between ws callbacks and the session fiber. */
interface Connection {
  readonly id: string
  readonly ws: WebSocket
  readonly frames: Mailbox.Mailbox<Frame>
  lastSeen: number
  queuedBinary: number
  queuedText: number
  overflow: boolean
  /** How the socket closed: the code ws sent after rejecting a frame, else the closing handshake's. */
  closeCode: number | undefined
  error: string | undefined
}

interface SessionContext {
  readonly token: Buffer
  readonly fsApi: DestinationFsApi
  readonly clients: SubscriptionRef.SubscriptionRef<number>
  readonly heartbeatIntervalMs: number
  readonly heartbeatTimeoutMs: number
  readonly helloTimeoutMs: number
}

/** Binary bytes a well-behaved client can have queued here: its window plus frame slack. */
const MAX_QUEUED_BINARY = WINDOW_BYTES + 2 * MAX_FRAME_BYTES
const MAX_QUEUED_TEXT = 64 * 1024 * 1024
const MAX_OPEN_WRITES = 256
const MAX_REMEMBERED_FAILED = 4096
const MANIFEST_PAGE = 1000

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

const send = (ws: WebSocket, message: DaemonMessage) =>
  Effect.sync(() => {
    if (ws.readyState === WebSocket.OPEN) ws.send(encodeDaemonMessage(message))
  })

/** Sends and waits until ws handed the frame to the socket (back-pressure for manifest pages). */
const sendAwait = (ws: WebSocket, message: DaemonMessage) =>
  Effect.async<void>((resume) => {
    if (ws.readyState !== WebSocket.OPEN) return resume(Effect.void)
    ws.send(encodeDaemonMessage(message), () => resume(Effect.void))
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

/** Reads the first frame: must be a valid Hello with our protocol version and token, and a usable root. */
const handshake = (conn: Connection, ctx: SessionContext) =>
  Effect.gen(function*() {
    const { ws } = conn
    const reject = (reason: Rejected["reason"], message: string) =>
      Effect.gen(function*() {
        yield* send(ws, new Rejected({ reason, message }))
        closeSocket(ws, 1008, `rejected: ${reason}`)
        yield* Effect.logWarning(`session ${conn.id}: rejected (${reason}): ${message}`)
        return Option.none<{ readonly hello: Hello; readonly root: string }>()
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
    const hello = decoded.right
    const root = yield* Effect.either(ctx.fsApi.resolveRoot(hello.destinationRoot))
    if (Either.isLeft(root)) return yield* reject("root", root.left.message)
    return Option.some({ hello, root: root.right })
  })

interface OpenWrite {
  readonly seq: number
  readonly path: string
  readonly size: number
  readonly mode: number
  readonly mtime: number
  readonly scope: Scope.CloseableScope
  readonly handle: WriteHandle
  remaining: number
}

/** Applies the operations of one authenticated session, in order, until it closes. */
const operations = (conn: Connection, ctx: SessionContext, root: string) =>
  Effect.gen(function*() {
    const { fsApi } = ctx
    const { ws } = conn
    const sessionScope = yield* Effect.scope
    const writes = new Map<number, OpenWrite>()
    /** Seqs already answered with OpFailed whose late chunks are dropped silently (insertion-ordered, bounded). */
    const failed = new Set<number>()
    const markFailed = (seq: number) => {
      failed.delete(seq)
      failed.add(seq)
      if (failed.size > MAX_REMEMBERED_FAILED) failed.delete(failed.values().next().value!)
    }
    const warn = (message: string) => Effect.logWarning(`session ${conn.id}: ${message}`)
    const credit = (bytes: number) => (bytes > 0 ? send(ws, new Credit({ bytes })) : Effect.void)
    const protocolClose = (message: string) =>
      Effect.gen(function*() {
        yield* warn(`${message}; closing session`)
        closeSocket(ws, 1002, message.slice(0, 120))
        return "close" as Next
      })

    const failOp = (seq: number, code: OpErrorCode, message: string) =>
      Effect.gen(function*() {
        const open = writes.get(seq)
        if (open !== undefined) {
          writes.delete(seq)
          yield* Scope.close(open.scope, Exit.void) // deletes the temp file
        }
        markFailed(seq)
        yield* send(ws, new OpFailed({ seq, code, message }))
      })

    const reply = (seq: number, op: Effect.Effect<void, DestinationError>) =>
      Effect.matchEffect(op, {
        onFailure: (e) =>
          Effect.zipRight(
            e._tag === "ConfinementError" ? warn(`op ${seq} refused: ${e.message}`) : Effect.void,
            send(ws, new OpFailed({ seq, code: errorCode(e), message: e.message }))
          ),
        onSuccess: () => send(ws, new Ack({ seq }))
      })

    const finishWrite = (open: OpenWrite) =>
      Effect.gen(function*() {
        const result = yield* Effect.either(open.handle.commit(open.mode, open.mtime))
        writes.delete(open.seq)
        yield* Scope.close(open.scope, Exit.void)
        if (Either.isLeft(result)) {
          markFailed(open.seq)
          if (result.left._tag === "ConfinementError") yield* warn(`write ${open.seq} refused: ${result.left.message}`)
          yield* send(ws, new OpFailed({ seq: open.seq, code: errorCode(result.left), message: result.left.message }))
        } else {
          yield* send(ws, new Ack({ seq: open.seq }))
        }
      })

    const onText = (data: Buffer) =>
      Effect.gen(function*() {
        const text = data.toString("utf8")
        const decoded = decodeClientMessage(text)
        if (Either.isLeft(decoded)) {
          const json = looseJson(text)
          const seq = looseSeq(json)
          if (json === undefined) return yield* protocolClose("invalid JSON text frame")
          if (seq === undefined) return yield* protocolClose(`invalid message (tag ${describeTag(json)})`)
          yield* warn(`op ${seq}: invalid or unknown message (tag ${describeTag(json)})`)
          yield* failOp(seq, "protocol", `invalid or unknown message (tag ${describeTag(json)})`)
          return "continue" as Next
        }
        const message = decoded.right
        switch (message._tag) {
          case "Hello":
            return yield* protocolClose("Hello after the handshake")
          case "Write": {
            const { seq } = message
            failed.delete(seq)
            if (writes.has(seq)) return yield* protocolClose(`Write ${seq} while a Write with that seq is open`)
            if (writes.size >= MAX_OPEN_WRITES) {
              yield* failOp(seq, "protocol", `more than ${MAX_OPEN_WRITES} concurrent writes`)
              return "continue" as Next
            }
            const scope = yield* Scope.fork(sessionScope, ExecutionStrategy.sequential)
            const opened = yield* Effect.either(fsApi.openWrite(root, message.path).pipe(Scope.extend(scope)))
            if (Either.isLeft(opened)) {
              yield* Scope.close(scope, Exit.void)
              if (opened.left._tag === "ConfinementError") yield* warn(`write ${seq} refused: ${opened.left.message}`)
              yield* failOp(seq, errorCode(opened.left), opened.left.message)
              return "continue" as Next
            }
            const open: OpenWrite = {
              seq,
              path: message.path,
              size: message.size,
              mode: message.mode,
              mtime: message.mtime,
              scope,
              handle: opened.right,
              remaining: message.size
            }
            writes.set(seq, open)
            if (open.size === 0) yield* finishWrite(open)
            return "continue" as Next
          }
          case "Abort": {
            if (writes.has(message.seq)) yield* failOp(message.seq, "aborted", "write aborted by the client")
            return "continue" as Next
          }
          case "Mkdir":
            yield* reply(message.seq, fsApi.mkdir(root, message.path, message.mode, message.mtime))
            return "continue" as Next
          case "Remove":
            yield* reply(message.seq, fsApi.remove(root, message.path))
            return "continue" as Next
          case "Rename":
            yield* reply(message.seq, fsApi.rename(root, message.from, message.to))
            return "continue" as Next
          case "Symlink":
            yield* reply(message.seq, fsApi.symlink(root, message.path, message.target, message.mtime))
            return "continue" as Next
          case "ListManifest": {
            const { seq } = message
            let previous: Chunk.Chunk<ManifestEntry> | undefined
            const walked = yield* Effect.either(
              fsApi.manifest(root).pipe(
                Stream.grouped(MANIFEST_PAGE),
                Stream.runForEach((page) =>
                  Effect.suspend(() => {
                    const pending = previous
                    previous = page
                    return pending === undefined
                      ? Effect.void
                      : sendAwait(ws, new Manifest({ seq, entries: Chunk.toReadonlyArray(pending), done: false }))
                  })
                )
              )
            )
            if (Either.isLeft(walked)) {
              yield* send(ws, new OpFailed({ seq, code: "io", message: walked.left.message }))
            } else {
              const entries = previous === undefined ? [] : Chunk.toReadonlyArray(previous)
              yield* sendAwait(ws, new Manifest({ seq, entries, done: true }))
              yield* send(ws, new Ack({ seq }))
            }
            return "continue" as Next
          }
        }
      })

    const onBinary = (data: Buffer) =>
      Effect.gen(function*() {
        const chunk = decodeChunk(data)
        if (chunk === undefined) return yield* protocolClose("binary frame shorter than 4 bytes")
        const { payload, seq } = chunk
        const open = writes.get(seq)
        if (open === undefined) {
          yield* credit(payload.byteLength)
          if (!failed.has(seq)) {
            yield* warn(`chunk for unknown seq ${seq}`)
            yield* failOp(seq, "protocol", `chunk for seq ${seq}, which has no open Write`)
          }
          return "continue" as Next
        }
        if (payload.byteLength > open.remaining) {
          yield* credit(payload.byteLength)
          yield* warn(`write ${seq}: more bytes than its size ${open.size}`)
          yield* failOp(seq, "protocol", `more chunk bytes than the announced size ${open.size}`)
          return "continue" as Next
        }
        const written = yield* Effect.either(open.handle.write(payload))
        yield* credit(payload.byteLength)
        if (Either.isLeft(written)) {
          yield* failOp(seq, "io", written.left.message)
          return "continue" as Next
        }
        open.remaining -= payload.byteLength
        if (open.remaining === 0) yield* finishWrite(open)
        return "continue" as Next
      })

    while (true) {
      const next = yield* Effect.either(conn.frames.take)
      if (Either.isLeft(next)) return
      const frame = next.right
      if (frame.binary) conn.queuedBinary -= frame.data.byteLength
      else conn.queuedText -= frame.data.byteLength
      const result: Next = frame.binary ? yield* onBinary(frame.data) : yield* onText(frame.data)
      if (result === "close") return
    }
  })

const session = (conn: Connection, ctx: SessionContext) =>
  Effect.gen(function*() {
    yield* Effect.addFinalizer(() => Effect.sync(() => closeSocket(conn.ws, 1001, "session ended")))
    yield* Effect.forkScoped(heartbeat(conn, ctx))
    const accepted = yield* handshake(conn, ctx)
    if (Option.isNone(accepted)) return
    const { hello, root } = accepted.value
    yield* Effect.acquireRelease(
      SubscriptionRef.update(ctx.clients, (n) => n + 1),
      () => SubscriptionRef.update(ctx.clients, (n) => n - 1)
    )
    yield* send(
      conn.ws,
      new Welcome({ protocolVersion: PROTOCOL_VERSION, daemonVersion: VERSION, sessionId: conn.id, root })
    )
    yield* Effect.logInfo(
      `session ${conn.id}: opened (client ${JSON.stringify(hello.clientId)}, project ${JSON.stringify(hello.project)}, root ${root})`
    )
    yield* operations(conn, ctx, root)
    const how = conn.closeCode === undefined ? "ended" : `closed (code ${conn.closeCode}${conn.error ? `: ${conn.error}` : ""})`
    if (conn.error !== undefined) yield* Effect.logWarning(`session ${conn.id}: ${how}`)
    else yield* Effect.logInfo(`session ${conn.id}: ${how}`)
  }).pipe(
    Effect.scoped,
    Effect.catchAllCause((cause) =>
      Cause.isInterruptedOnly(cause)
        ? Effect.void
        : Effect.zipRight(
          Effect.logError(`session ${conn.id}: failed: ${Cause.pretty(cause).split("\n")[0]}`),
          Effect.sync(() => conn.ws.terminate())
        )
    )
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
        if (conn.queuedBinary > MAX_QUEUED_BINARY || conn.queuedText > MAX_QUEUED_TEXT) {
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

/**
 * RemoteConnection: sessions to destination roots, each a channel of the one authenticated WebSocket
 * link this process keeps to the daemon of that destination's host.
 *
 * Operations are pipelined: `send` puts the frame on the wire at once (the daemon applies them as
 * if in the order they were sent, see Protocol.ts) and hands back an effect that waits for that
 * operation's ack, whenever it comes. File bytes are streamed in `CHUNK_BYTES` frames under a byte window that the
 * daemon refills with `Credit`, so neither side buffers more than `WINDOW_BYTES` per session.
 */
import { Context, Data, Deferred, Duration, Effect, FiberId, Layer, RcMap, type Scope } from "effect"
import { randomUUID } from "node:crypto"
import WebSocket from "ws"
import type { ResolvedDestination, ResolvedProject } from "../schemas/ConfigFile.js"
import { type BufferPool, makeBufferPool } from "./bufferPool.js"
import { ConnectError, DaemonLocator, type Endpoint } from "./DaemonLocator.js"
import {
  Abort,
  type BatchFile,
  CHUNK_BYTES,
  CHUNK_HEADER_BYTES,
  Close,
  type DaemonMessage,
  decodeDaemonMessage,
  encodeChunk,
  encodeClientMessage,
  frameChunk,
  Hello,
  ListManifest,
  type ManifestEntry,
  MAX_BATCH_BYTES,
  MAX_BATCH_FILES,
  MAX_OPEN_WRITES,
  type Mkdir,
  Open,
  PROTOCOL_VERSION,
  type Remove,
  type Rename,
  type Symlink,
  WINDOW_BYTES,
  Write
} from "../schemas/Protocol.js"

// ---- errors -----------------------------------------------------------------------------------

/** The session died (socket closed, heartbeat missed); operations not yet acked may not have been applied. */
export class ConnectionLost extends Data.TaggedError("ConnectionLost")<{
  readonly dest: string
  readonly message: string
}> {}

/** The local file changed while it was being sent; the remote write was abandoned. Try again once it settles. */
export class SourceChanged extends Data.TaggedError("SourceChanged")<{ readonly path: string }> {}

/** The local file could not be read (permissions, I/O); the remote write was abandoned. */
export class SourceUnreadable extends Data.TaggedError("SourceUnreadable")<{ readonly path: string; readonly message: string }> {}

/** The daemon refused or failed one operation; the session goes on. */
export class OperationFailed extends Data.TaggedError("OperationFailed")<{
  readonly dest: string
  readonly path: string
  readonly code: "confinement" | "io" | "protocol" | "aborted"
  readonly message: string
}> {}

// ---- sessions ---------------------------------------------------------------------------------

/** The daemon's answer to one operation, as a Deferred offers it: waited for, or looked at. */
export interface Ack {
  /** Completes when the answer comes: an operation the daemon refused fails with `OperationFailed`. */
  readonly wait: Effect.Effect<void, OperationFailed | ConnectionLost>
  /** Whether the answer has come (`wait` then completes at once). */
  readonly done: () => boolean
}

/** An answer already given: the operation succeeded. */
export const acked: Ack = { wait: Effect.void, done: () => true }

type Input<T> = Omit<T, "seq" | "ch" | "_tag">
export type OperationInput =
  | Input<Mkdir> & { readonly _tag: "Mkdir" }
  | Input<Remove> & { readonly _tag: "Remove" }
  | Input<Rename> & { readonly _tag: "Rename" }
  | Input<Symlink> & { readonly _tag: "Symlink" }

/**
 * `encodeClientMessage` of an operation, without the Schema: their encoding is the identity, and going
 * through the class and the encoder cost ~50 µs each, ~100 ms of an initial sync's 2,000 directories
 * before its first file left. The values are the client's own (lstat, its counters); the daemon checks
 * what it decodes. Fields are picked, not spread: nothing else goes on the wire.
 */
export const encodeOperation = (ch: number, seq: number, op: OperationInput): string => {
  switch (op._tag) {
    case "Mkdir":
      return JSON.stringify({ _tag: op._tag, ch, seq, path: op.path, mode: op.mode, mtime: op.mtime })
    case "Remove":
      return JSON.stringify({ _tag: op._tag, ch, seq, path: op.path })
    case "Rename":
      return JSON.stringify({ _tag: op._tag, ch, seq, from: op.from, to: op.to })
    case "Symlink":
      return JSON.stringify({ _tag: op._tag, ch, seq, path: op.path, target: op.target, mtime: op.mtime })
  }
}

export interface FileSource {
  readonly path: string
  readonly size: number
  readonly mode: number
  readonly mtime: number
  /**
   * A small file read at once into `target` at `offset`, where `size + 1` bytes are free (a file that
   * grew shows as changed): the bytes read, exactly `size`, or why not. Batched writes read files
   * straight into the frame that carries them.
   */
  readonly readInto?: (target: Buffer, offset: number) => number | SourceChanged | SourceUnreadable
  /** Produces the file's bytes in order, calling `emit` for each chunk and awaiting it. */
  readonly read: (
    emit: (chunk: Uint8Array) => Effect.Effect<void, ConnectionLost>
  ) => Effect.Effect<void, ConnectionLost | SourceChanged | SourceUnreadable>
}

/** One destination root, open on the daemon (a channel of the host's shared link). */
export interface Session {
  /** The destination root as resolved on the daemon's machine. */
  readonly root: string
  /** Sends one operation now, returning its ack. */
  readonly send: (op: OperationInput) => Effect.Effect<Ack, ConnectionLost>
  /**
   * Streams a file; resolves once every byte is on the wire, returning the ack to wait for.
   * A source that changes or fails while read aborts the remote write (nothing partial is kept).
   */
  readonly write: (source: FileSource) => Effect.Effect<Ack, ConnectionLost | SourceChanged | SourceUnreadable>
  /**
   * The same for a small file with `readInto`: read into the channel's next `WriteBatch`, sent with
   * the other files of this turn of the event loop. Waits only when the credit window is full.
   * Optional: test doubles may leave it out.
   */
  readonly writeSmall?: (source: FileSource) => Effect.Effect<Ack, ConnectionLost | SourceChanged | SourceUnreadable>
  readonly manifest: Effect.Effect<ReadonlyArray<ManifestEntry>, OperationFailed | ConnectionLost>
  /** Completes when the session is gone. */
  readonly closed: Effect.Effect<ConnectionLost>
}

export interface SessionOptions {
  readonly heartbeatInterval: Duration.DurationInput
  readonly heartbeatTimeout: Duration.DurationInput
  readonly openTimeout: Duration.DurationInput
}

/** A new batch buffer's size, unless its first file needs more. */
const BATCH_BUFFER_BYTES = CHUNK_HEADER_BYTES + 256 * 1024
/** Written batch buffers kept for reuse: a channel's credit window holds 32 in flight (8 MiB kept at most). */
const IDLE_BATCH_BUFFERS = 32

/** Batch buffers for one link (the service shares one among all its links). */
export const makeBatchBuffers = (): BufferPool => makeBufferPool(BATCH_BUFFER_BYTES, IDLE_BATCH_BUFFERS)

/** A buffer batches are cut from, one after another. */
interface BatchBuffer {
  readonly bytes: Buffer
  /** Frames cut from it that the socket has not finished with. */
  unwritten: number
  /** Batches may still be cut from it: it holds the batch being filled, or the spare room after the last. */
  current: boolean
}

/** A dead link is declared within interval + timeout = 4.5 s (DESIGN: "within seconds", issue: 5 s). */
const defaults: SessionOptions = { heartbeatInterval: "1 second", heartbeatTimeout: "3500 millis", openTimeout: "10 seconds" }

type Outcome = Effect.Effect<void, OperationFailed | ConnectionLost>

interface Pending {
  readonly path: string
  /** Answers the operation; only the first answer counts. */
  readonly settle: (outcome: Outcome) => void
  readonly entries?: Array<ManifestEntry>
  readonly write?: true
}

/**
 * A reply awaited by one operation (one waiter at a time). Made per operation, so it is a closure and
 * not a Deferred (making 22,000 Deferreds cost ~150 ms of a big sync's CPU, each copying Effect's prototype).
 */
const reply = () => {
  let outcome: Outcome | undefined
  let resume: ((outcome: Outcome) => void) | undefined
  const settle = (answer: Outcome) => {
    if (outcome !== undefined) return
    outcome = answer
    resume?.(answer)
  }
  const wait: Outcome = Effect.async<void, OperationFailed | ConnectionLost>((r) => {
    // Checked here, where the waiter registers: the fiber may yield before this runs, and the reply
    // may come meanwhile.
    if (outcome !== undefined) return r(outcome)
    resume = r
    return Effect.sync(() => {
      resume = undefined
    })
  })
  return { settle, ack: { wait, done: () => outcome !== undefined } satisfies Ack }
}

/** What the link needs of a channel: the daemon's replies on it, and the news that the link is gone. */
interface ChannelHandler {
  readonly onMessage: (message: DaemonMessage) => void
  readonly lose: (message: string) => void
}

/**
 * One authenticated WebSocket session to a daemon, shared by every destination a process syncs on
 * that daemon's host: each opens a channel on it (`open`).
 */
export interface Link {
  readonly open: (dest: ResolvedDestination, project: ResolvedProject) => Effect.Effect<Session, ConnectError, Scope.Scope>
  /** Completes when the link is gone (all its channels are lost with it). */
  readonly closed: Effect.Effect<void>
}

/** Opens a link (`label` names it in errors); it is closed (with code 1000) when the scope closes. */
export const openLink = (
  label: string,
  endpoint: Endpoint,
  options: SessionOptions = defaults,
  batchBuffers: BufferPool = makeBatchBuffers()
): Effect.Effect<Link, ConnectError, Scope.Scope> =>
  Effect.gen(function* () {
    const channels = new Map<number, ChannelHandler>()
    const closed = yield* Deferred.make<void>()
    let nextCh = 0
    let lastPong = Date.now()
    let lostWith: string | undefined
    const lose = (message: string) => {
      if (lostWith !== undefined) return
      lostWith = message
      Deferred.unsafeDone(closed, Effect.void)
      for (const channel of channels.values()) channel.lose(message)
      channels.clear()
    }

    const hello = new Hello({ protocolVersion: PROTOCOL_VERSION, token: endpoint.token, clientId: randomUUID() })

    const ws = yield* Effect.acquireRelease(
      Effect.async<WebSocket, ConnectError>((resume) => {
        const ws = new WebSocket(endpoint.url, {
          perMessageDeflate: false,
          maxPayload: 64 * 1024 * 1024,
          // Masking guards shared HTTP proxies; this link is 127.0.0.1 or an SSH tunnel. An all-zero
          // mask (still valid WebSocket) lets ws skip masking every byte in JavaScript.
          generateMask: (mask: Buffer) => void mask.fill(0),
          handshakeTimeout: Duration.toMillis(options.openTimeout),
          ...(endpoint.createConnection !== undefined ? { createConnection: endpoint.createConnection as never } : {})
        })
        ws.binaryType = "nodebuffer"
        let opened = false
        const refuse = (message: string, retryable: boolean) => {
          if (opened) return
          opened = true
          ws.terminate()
          resume(Effect.fail(new ConnectError({ dest: label, message, retryable })))
        }
        ws.on("open", () => ws.send(encodeClientMessage(hello)))
        ws.on("error", (error) => {
          if (!opened) refuse(`cannot reach the daemon at ${endpoint.url}: ${error.message}`, true)
          else lose(error.message)
        })
        ws.on("close", (code, reason) => {
          if (!opened) refuse(`the daemon closed the connection (${code}${reason.length > 0 ? ` ${reason}` : ""})`, true)
          else lose(`connection closed (${code}${reason.length > 0 ? ` ${reason.toString()}` : ""})`)
        })
        ws.on("pong", () => {
          lastPong = Date.now()
        })
        ws.on("message", (data: Buffer, isBinary) => {
          lastPong = Date.now() // anything from the daemon proves the link alive
          if (isBinary) return lose("unexpected binary frame from the daemon")
          const decoded = decodeDaemonMessage(data.toString("utf8"))
          if (decoded._tag === "Left") return lose(`unreadable message from the daemon: ${data.toString("utf8").slice(0, 200)}`)
          const message = decoded.right
          if (!opened) {
            if (message._tag === "Welcome") {
              opened = true
              return resume(Effect.succeed(ws))
            }
            if (message._tag === "Rejected") {
              // A token changes when the daemon restarts: worth another look-up. A version problem is not.
              return refuse(`the daemon refused the session (${message.reason}): ${message.message}`, message.reason === "token")
            }
            return refuse(`unexpected ${message._tag} before Welcome`, true)
          }
          if (message._tag === "Welcome" || message._tag === "Rejected") return lose(`unexpected ${message._tag} from the daemon`)
          // A channel that was let go may still get its last replies: they are nobody's.
          channels.get(message.ch)?.onMessage(message)
        })
        return Effect.sync(() => ws.terminate())
      }),
      (ws) =>
        Effect.async<void>((resume) => {
          if (ws.readyState === WebSocket.CLOSED) return resume(Effect.void)
          // A daemon that does not answer the close within a second is cut off; one that does must
          // not keep the process alive for that second.
          const timer = setTimeout(() => ws.terminate(), 1000)
          ws.once("close", () => {
            clearTimeout(timer)
            resume(Effect.void)
          })
          ws.close(1000, "bye")
          return Effect.sync(() => clearTimeout(timer))
        }).pipe(Effect.ensuring(Effect.sync(() => lose("session closed"))))
    )

    // Heartbeat: a daemon (or tunnel) that stops answering pings is declared lost.
    const interval = Duration.toMillis(options.heartbeatInterval)
    const timeout = Duration.toMillis(options.heartbeatTimeout)
    yield* Effect.gen(function* () {
      for (;;) {
        yield* Effect.sleep(interval)
        if (Date.now() - lastPong > timeout) {
          ws.terminate()
          lose(`no heartbeat from the daemon for ${(timeout / 1000).toFixed(1)} s`)
          return
        }
        if (ws.readyState === WebSocket.OPEN) ws.ping()
      }
    }).pipe(Effect.interruptible, Effect.forkScoped)

    // Frames sent in one turn of the event loop leave in one write: a big sync sends thousands of
    // small frames, and a syscall each was the client's largest single cost. (`_socket` is ws's
    // own name for the stream it writes to; there is no public handle.)
    const socket = (ws as unknown as { readonly _socket?: { cork(): void; uncork(): void } })._socket
    let corked = false
    const uncork = () => {
      corked = false
      socket?.uncork()
    }
    /**
     * Puts a frame on the wire (corked until the end of this tick); false once the link is down.
     * `written` is called once nothing refers to `data` any more (its bytes copied into SSH packets, or
     * written to the socket, or the socket destroyed meanwhile), and not when the write failed.
     */
    const put = (data: string | Buffer, written?: () => void): boolean => {
      if (ws.readyState !== WebSocket.OPEN) {
        lose("connection closed")
        return false
      }
      if (!corked && socket !== undefined) {
        corked = true
        socket.cork()
        process.nextTick(uncork)
      }
      if (written === undefined) ws.send(data)
      // (A write callback gets null or undefined for success, depending on the stream.)
      else ws.send(data, (error) => error == null && written())
      return true
    }

    const open = (dest: ResolvedDestination, project: ResolvedProject) =>
      Effect.gen(function* () {
        const ch = nextCh++
        const channel = yield* Effect.acquireRelease(
          Effect.async<ReturnType<typeof makeChannel>, ConnectError>((resume) => {
            if (lostWith !== undefined) {
              return resume(Effect.fail(new ConnectError({ dest: dest.name, message: lostWith, retryable: true })))
            }
            const timer = setTimeout(
              () => settle(Effect.fail(new ConnectError({ dest: dest.name, message: `no answer to opening ${dest.destinationLocation}`, retryable: true }))),
              Duration.toMillis(options.openTimeout)
            )
            let settled = false
            const settle = (result: Effect.Effect<ReturnType<typeof makeChannel>, ConnectError>) => {
              if (settled) return
              settled = true
              clearTimeout(timer)
              resume(result)
            }
            channels.set(ch, {
              onMessage: (message) => {
                if (message._tag === "Opened") return settle(Effect.succeed(makeChannel(ch, dest, message.root)))
                if (message._tag === "OpenFailed") {
                  channels.delete(ch)
                  // A root that cannot be used now will not be usable on a retry either.
                  return settle(Effect.fail(new ConnectError({ dest: dest.name, message: `the daemon cannot open ${dest.destinationLocation}: ${message.message}`, retryable: false })))
                }
              },
              lose: (message) => settle(Effect.fail(new ConnectError({ dest: dest.name, message, retryable: true })))
            })
            put(encodeClientMessage(new Open({ ch, project: project.name, destinationRoot: dest.destinationLocation })))
            return Effect.sync(() => {
              clearTimeout(timer)
              channels.delete(ch)
            })
          }),
          (channel) => channel.close
        )
        return channel.session
      })

    /** The operations of channel `ch`, once the daemon opened it on `root`. */
    const makeChannel = (ch: number, dest: ResolvedDestination, root: string) => {
      const destName = dest.name
      const pending = new Map<number, Pending>()
      const channelClosed = Deferred.unsafeMake<ConnectionLost>(FiberId.none)
      let nextSeq = 1
      // Flow-control window in bytes; writers wait on `creditWaiters` when it runs out.
      let window = WINDOW_BYTES
      const creditWaiters = new Set<() => void>()
      let openWrites = 0
      const writeWaiters = new Set<() => void>()
      let lostWith: ConnectionLost | undefined
      let onClosed: (() => void) | undefined
      /** A `WriteBatch` being filled: its files' bytes follow `CHUNK_HEADER_BYTES` of its buffer, from `start`. */
      let batch:
        | { readonly seq: number; readonly files: Array<BatchFile>; readonly buffer: BatchBuffer; readonly start: number; used: number }
        | undefined
      /**
       * Where the next batch can start: batches are cut one after another from one buffer, so a batch of
       * a few files (a turn of live edits, or one cut short by a Mkdir) neither allocates nor holds a
       * buffer of its own while the socket still has it.
       */
      let spare: { readonly buffer: BatchBuffer; readonly offset: number } | undefined
      // Batch buffers come from the pool and go back once written (in an initial sync of 200 MB,
      // fresh ones made V8 start 4–5 full collections for "external memory pressure", and cost the
      // client ~0.15 s of CPU).
      const takeBuffer = (needs: number): BatchBuffer => ({
        bytes: needs <= batchBuffers.size ? batchBuffers.take() : Buffer.allocUnsafeSlow(needs),
        unwritten: 0,
        current: true
      })
      /** Gives `buffer` back once nothing more is cut from it and the socket is done with all that was. */
      const mayRecycle = (buffer: BatchBuffer) => {
        if (!buffer.current && buffer.unwritten === 0) batchBuffers.give(buffer.bytes)
      }

      const loseChannel = (message: string) => {
        if (lostWith !== undefined) return
        const lost = new ConnectionLost({ dest: destName, message })
        lostWith = lost
        batch = undefined
        Deferred.unsafeDone(channelClosed, Effect.succeed(lost))
        for (const p of pending.values()) p.settle(Effect.fail(lost))
        pending.clear()
        for (const wake of creditWaiters) wake()
        creditWaiters.clear()
        for (const wake of writeWaiters) wake()
        writeWaiters.clear()
        onClosed?.()
      }

      /** Answers the `count` operations from `seq` on (a reply without a count answers one). */
      const settleFrom = (first: number, count: number | undefined, outcome: (path: string) => Outcome) => {
        for (let seq = first; seq < first + (count ?? 1); seq++) {
          const p = pending.get(seq)
          if (p === undefined) continue
          pending.delete(seq)
          answered(p)
          p.settle(outcome(p.path))
        }
      }
      const addCredit = (bytes: number) => {
        window += bytes
        for (const wake of creditWaiters) wake()
        creditWaiters.clear()
      }

      channels.set(ch, {
        lose: loseChannel,
        onMessage: (message) => {
          switch (message._tag) {
            case "Ack":
              return settleFrom(message.seq, message.count, () => Effect.void)
            case "OpFailed":
              return settleFrom(message.seq, message.count, (path) =>
                Effect.fail(new OperationFailed({ dest: destName, path, code: message.code, message: message.message }))
              )
            case "Credit":
              return addCredit(message.bytes)
            case "Manifest": {
              pending.get(message.seq)?.entries?.push(...message.entries)
              return
            }
            case "Closed":
              return loseChannel("session closed")
            default:
              return lose(`unexpected ${message._tag} on channel ${ch}`)
          }
        }
      })

      /** Asks the daemon to finish the channel and waits (a second at most) until it has. */
      const close = Effect.async<void>((resume) => {
        if (lostWith !== undefined) return resume(Effect.void)
        const timer = setTimeout(() => loseChannel("session closed"), 1000)
        onClosed = () => {
          clearTimeout(timer)
          channels.delete(ch)
          resume(Effect.void)
        }
        flushBatch()
        if (!put(encodeClientMessage(new Close({ ch })))) loseChannel("session closed")
        return Effect.sync(() => clearTimeout(timer))
      })

      const ensureOpen = Effect.suspend(() => (lostWith === undefined ? Effect.void : Effect.fail(lostWith)))

      /** Registers an operation about to be sent (after the open batch, which goes first). */
      const register = (path: string, what: Pick<Pending, "entries" | "write"> = {}) => {
        flushBatch()
        return registerNow(path, what)
      }
      const registerNow = (path: string, what: Pick<Pending, "entries" | "write">) => {
        const seq = nextSeq
        nextSeq = nextSeq >= 0xffffffff ? 1 : nextSeq + 1
        const { settle, ack } = reply()
        pending.set(seq, { path, settle, ...what })
        if (what.write) openWrites++
        return { seq, ack }
      }
      /** An answered Write frees its place among the `MAX_OPEN_WRITES`. */
      const answered = (p: Pending | undefined) => {
        if (p?.write !== true) return
        openWrites--
        for (const wake of writeWaiters) wake()
        writeWaiters.clear()
      }
      /** Waits while `MAX_OPEN_WRITES` Writes are unanswered (many small files outrun the byte window). */
      const takeWriteSlot: Effect.Effect<void, ConnectionLost> = Effect.suspend(() =>
        openWrites < MAX_OPEN_WRITES
          ? Effect.void
          : Effect.async<void>((resume) => {
            const wake = () => resume(Effect.void)
            writeWaiters.add(wake)
            return Effect.sync(() => writeWaiters.delete(wake))
          }).pipe(Effect.zipRight(ensureOpen), Effect.zipRight(takeWriteSlot))
      )

      const frame = (data: string | Buffer) =>
        Effect.suspend(() => {
          if (lostWith === undefined && put(data)) return Effect.void
          loseChannel(lostWith?.message ?? "connection closed")
          return Effect.fail(lostWith!)
        })

      const send = (op: OperationInput) =>
        Effect.gen(function* () {
          yield* ensureOpen
          const path = op._tag === "Rename" ? op.from : op.path
          const { ack, seq } = register(path)
          yield* frame(encodeOperation(ch, seq, op))
          return ack
        })

      const takeCredit = (bytes: number): Effect.Effect<void, ConnectionLost> =>
        Effect.suspend(() => {
          // A chunk bigger than the whole window still goes once the window is full again.
          if (window >= Math.min(bytes, WINDOW_BYTES)) {
            window -= bytes
            return Effect.void
          }
          return Effect.async<void>((resume) => {
            const wake = () => resume(Effect.void)
            creditWaiters.add(wake)
            return Effect.sync(() => creditWaiters.delete(wake))
          }).pipe(Effect.zipRight(ensureOpen), Effect.zipRight(takeCredit(bytes)))
        })

      const write = (source: FileSource) =>
        Effect.gen(function* () {
          yield* ensureOpen
          yield* takeWriteSlot
          const { ack, seq } = register(source.path, { write: true })
          yield* frame(
            encodeClientMessage(new Write({ ch, seq, path: source.path, size: source.size, mode: source.mode, mtime: source.mtime }))
          )
          let sent = 0
          const abort = Effect.suspend(() => Effect.zipRight(frame(encodeClientMessage(new Abort({ ch, seq }))), Effect.ignore(ack.wait)))
          yield* source
            .read((chunk) =>
              Effect.gen(function* () {
                for (let offset = 0; offset < chunk.byteLength; offset += CHUNK_BYTES) {
                  const piece = chunk.subarray(offset, Math.min(offset + CHUNK_BYTES, chunk.byteLength))
                  yield* takeCredit(piece.byteLength)
                  yield* frame(encodeChunk(ch, seq, piece))
                  sent += piece.byteLength
                }
              })
            )
            .pipe(
              Effect.filterOrFail(
                () => sent === source.size,
                () => new SourceChanged({ path: source.path })
              ),
              // Wait for the daemon to discard its partial file so a retry cannot race it.
              Effect.tapError((error) => (error._tag === "ConnectionLost" ? Effect.void : abort))
            )
          return ack
        })

      /** Sends the batch being filled, if any. */
      const flushBatch = () => {
        const b = batch
        batch = undefined
        if (b === undefined) return
        if (b.files.length === 0) {
          spare = { buffer: b.buffer, offset: b.start }
          return
        }
        const end = b.start + CHUNK_HEADER_BYTES + b.used
        spare = { buffer: b.buffer, offset: end }
        // Plain JSON: the Schema encoding of a WriteBatch is the identity.
        if (!put(JSON.stringify({ _tag: "WriteBatch", ch, seq: b.seq, files: b.files }))) return
        if (b.used === 0) return
        const buffer = b.buffer
        buffer.unwritten++
        put(frameChunk(ch, b.seq, buffer.bytes.subarray(b.start, end)), () => {
          buffer.unwritten--
          mayRecycle(buffer)
        })
      }
      /** Sends the batch being filled unless `size` more bytes fit in it. */
      const makeRoom = (size: number) => {
        if (batch === undefined) return
        const fits = batch.files.length < MAX_BATCH_FILES && batch.seq + batch.files.length === nextSeq &&
          batch.start + CHUNK_HEADER_BYTES + batch.used + size < batch.buffer.bytes.byteLength
        if (!fits) flushBatch()
      }

      /**
       * Reads a small file into the batch being filled, which leaves at the end of this turn of the event
       * loop, or sooner when full or when another operation of the channel is sent.
       */
      const writeSmall = (source: FileSource) =>
        Effect.suspend((): Effect.Effect<Ack, ConnectionLost | SourceChanged | SourceUnreadable> => {
          if (source.readInto === undefined || source.size > MAX_BATCH_BYTES) return write(source)
          if (lostWith !== undefined || ws.readyState !== WebSocket.OPEN) {
            loseChannel(lostWith?.message ?? "connection closed")
            return Effect.fail(lostWith!)
          }
          makeRoom(source.size)
          if (window >= source.size && ((batch !== undefined && batch.files.length > 0) || openWrites < MAX_OPEN_WRITES)) {
            window -= source.size
            return addToBatch(source)
          }
          // What is filled leaves now, not after the wait.
          flushBatch()
          return takeWriteSlot.pipe(
            Effect.zipRight(takeCredit(source.size)),
            Effect.zipRight(ensureOpen),
            Effect.flatMap(() => {
              makeRoom(source.size)
              return addToBatch(source)
            })
          )
        })
      /** Reads `source` into the batch being filled (opening one) and registers it; its credit is taken. */
      const addToBatch = (source: FileSource): Effect.Effect<Ack, SourceChanged | SourceUnreadable> => {
        if (batch === undefined) {
          // The file and the byte that shows it grew, after the frame header.
          const needs = CHUNK_HEADER_BYTES + source.size + 1
          if (spare !== undefined && spare.offset + needs <= spare.buffer.bytes.byteLength) {
            batch = { seq: nextSeq, files: [], buffer: spare.buffer, start: spare.offset, used: 0 }
          } else {
            if (spare !== undefined) {
              spare.buffer.current = false
              mayRecycle(spare.buffer)
            }
            batch = { seq: nextSeq, files: [], buffer: takeBuffer(needs), start: 0, used: 0 }
          }
          spare = undefined
          process.nextTick(flushBatch)
        }
        const b = batch
        const read = source.readInto!(b.buffer.bytes, b.start + CHUNK_HEADER_BYTES + b.used)
        if (typeof read !== "number") {
          // taken for a file that is not sent after all
          addCredit(source.size)
          return Effect.fail(read)
        }
        // The first file holds the batch's place among the open writes.
        const { ack } = registerNow(source.path, b.files.length === 0 ? { write: true } : {})
        b.files.push({ path: source.path, size: read, mode: source.mode, mtime: source.mtime })
        b.used += read
        return Effect.succeed(ack)
      }

      const manifest = Effect.gen(function* () {
        yield* ensureOpen
        const entries: Array<ManifestEntry> = []
        const { ack, seq } = register(".", { entries })
        yield* frame(encodeClientMessage(new ListManifest({ ch, seq })))
        yield* ack.wait
        return entries
      })

      const session: Session = { root, send, write, writeSmall, manifest, closed: Deferred.await(channelClosed) }
      return { session, close }
    }

    return { open, closed: Deferred.await(closed) } satisfies Link
  })

// ---- the service ------------------------------------------------------------------------------

export class RemoteConnection extends Context.Tag("sicksync/RemoteConnection")<
  RemoteConnection,
  {
    /** Locates (starting if needed) the destination's daemon and opens a session to it. */
    readonly open: (dest: ResolvedDestination, project: ResolvedProject) => Effect.Effect<Session, ConnectError, Scope.Scope>
  }
>() {}

/**
 * Destinations reached through the same daemon share one link. Two spellings of one host (an alias
 * and its address) get a link each, still over one SSH connection to one daemon.
 */
const linkKey = (dest: ResolvedDestination) =>
  dest.transport === "local" ? "local" : JSON.stringify([dest.hostname, dest.username ?? null, dest.port ?? null, dest.identityFile ?? null])

/**
 * Every destination of a daemon's host shares one link, opened when the first of them connects and
 * closed when the last lets go. A link that fails or dies is retired: the next connect opens a new one
 * (a key carries its generation, so the dead one is never handed out again).
 */
export const make = (options: SessionOptions = defaults) =>
  Effect.gen(function* () {
    const locator = yield* DaemonLocator
    const generations = new Map<string, number>()
    /** The destination a key's link is located with: any of those sharing it will do. */
    const locateWith = new Map<string, ResolvedDestination>()
    const batchBuffers = makeBatchBuffers()
    const keyOf = (base: string) => `${generations.get(base) ?? 0}:${base}`
    const retire = (key: string) =>
      Effect.sync(() => {
        const base = key.slice(key.indexOf(":") + 1)
        if (keyOf(base) === key) generations.set(base, (generations.get(base) ?? 0) + 1)
        locateWith.delete(key)
      })
    const links = yield* RcMap.make({
      lookup: (key: string) =>
        Effect.gen(function* () {
          const dest = locateWith.get(key)!
          const endpoint = yield* locator.locate(dest)
          const link = yield* openLink(dest.hostname, endpoint, options, batchBuffers)
          yield* Effect.forkScoped(Effect.zipRight(link.closed, retire(key)))
          return link
        }).pipe(Effect.tapError(() => retire(key)))
    })
    return RemoteConnection.of({
      open: (dest, project) =>
        Effect.gen(function* () {
          const key = keyOf(linkKey(dest))
          if (!locateWith.has(key)) locateWith.set(key, dest)
          const link = yield* RcMap.get(links, key)
          return yield* link.open(dest, project)
        }).pipe(
          Effect.mapError((error) => (error.dest === dest.name ? error : new ConnectError({ ...error, dest: dest.name }))),
          Effect.withSpan("RemoteConnection.open", { attributes: { dest: dest.name } })
        )
    })
  })

export const layer = (options: SessionOptions = defaults) => Layer.scoped(RemoteConnection, make(options))

// ---- test double ------------------------------------------------------------------------------

/** What an in-memory destination holds: path → entry (file bytes as a Buffer). */
export type MemoryTree = Map<string, ManifestEntry & { readonly content?: Buffer }>

/**
 * A RemoteConnection whose destinations are in memory, one tree per destination name: for tests
 * and for programs that embed sicksync. Operations are applied in order and acked at once.
 */
export const makeMemory = () => {
  const trees = new Map<string, MemoryTree>()
  const treeOf = (dest: string) => {
    let tree = trees.get(dest)
    if (tree === undefined) trees.set(dest, (tree = new Map()))
    return tree
  }
  const under = (p: string, root: string) => p === root || p.startsWith(`${root}/`)
  const removeTree = (tree: MemoryTree, root: string) => {
    for (const p of [...tree.keys()]) if (under(p, root)) tree.delete(p)
  }
  const open = (dest: ResolvedDestination) =>
    Effect.sync((): Session => {
      const tree = treeOf(dest.name)
      return {
        root: dest.destinationLocation,
        send: (op) =>
          Effect.sync(() => {
            switch (op._tag) {
              case "Mkdir":
                tree.set(op.path, { path: op.path, type: "dir", size: 0, mtime: op.mtime ?? 0, mode: op.mode ?? 0o755 })
                break
              case "Remove":
                removeTree(tree, op.path)
                break
              case "Rename":
                for (const [p, entry] of [...tree]) {
                  if (!under(p, op.from)) continue
                  tree.delete(p)
                  const moved = op.to + p.slice(op.from.length)
                  tree.set(moved, { ...entry, path: moved })
                }
                break
              case "Symlink":
                tree.set(op.path, { path: op.path, type: "symlink", size: 0, mtime: 0, mode: 0, target: op.target })
            }
            return acked
          }),
        write: (source) =>
          Effect.gen(function* () {
            const parts: Array<Uint8Array> = []
            yield* source.read((chunk) => Effect.sync(() => void parts.push(chunk)))
            const content = Buffer.concat(parts)
            removeTree(tree, source.path)
            tree.set(source.path, { path: source.path, type: "file", size: content.byteLength, mtime: source.mtime, mode: source.mode, content })
            return acked
          }),
        manifest: Effect.sync(() => [...tree.values()].map(({ content: _content, ...entry }) => entry)),
        closed: Effect.never
      }
    })
  return {
    /** The destinations' trees, by destination name. */
    trees,
    layer: Layer.succeed(RemoteConnection, RemoteConnection.of({ open: (dest) => open(dest) }))
  }
}

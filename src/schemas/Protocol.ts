/**
 * The sicksync wire protocol: one WebSocket per (client process, daemon), carrying one channel per
 * destination root that client syncs there — every project and destination of a `sicksync --all`
 * on one host shares one session.
 *
 * Control messages are JSON text frames decoded with `ClientMessage` / `DaemonMessage`. The first
 * is `Hello` (token) → `Welcome`; then `Open { ch, destinationRoot }` → `Opened { ch, root }` (or
 * `OpenFailed`) starts a channel, `Close { ch }` → `Closed { ch }` ends it once everything sent on
 * it has been applied. Channel numbers are the client's, never reused within a session; every
 * channel message names its `ch` (absent means 0).
 *
 * File contents travel in binary frames: a 4-byte big-endian channel, a 4-byte big-endian sequence
 * number naming the `Write` they belong to, then raw bytes. A `Write { size }` is followed by
 * binary frames for its seq whose payloads add up to exactly `size` (none for an empty file).
 *
 * Small files travel many to a message: `WriteBatch { seq, files }` is the `Write` of the files'
 * bytes one after the other (binary frames for `seq`, adding up to the sum of their sizes), and file
 * `i` is operation `seq + i`. Its files are written in any order, side by side, so a batch never names
 * one path twice. It is answered by one `Ack { seq, count }` when every file was written, else by one
 * reply per file; a batch that fails as a whole (aborted, malformed) by one `OpFailed { seq, count }`.
 *
 * Flow control, per channel: the daemon returns `Credit { ch, bytes }` once it has put chunk bytes
 * on disk; the client keeps at most `WINDOW_BYTES` of unacknowledged chunk bytes in flight per
 * channel, so a slow disk on the remote bounds memory on both sides, and one channel's backlog
 * never holds up another's.
 *
 * Every operation carries a client-chosen `seq` (unique within its channel) and is answered by
 * exactly one `Ack { ch, seq }` or `OpFailed { ch, seq }`, in the order operations complete; a reply
 * with a `count` answers the `count` operations from `seq` on.
 * Operations of a channel are applied as if in the order they were sent: one never runs before an
 * earlier one on the same path, an ancestor or a descendant (independent ones run concurrently).
 * A client sends a `Write`'s chunks before the chunks of any later `Write` to the same, an ancestor
 * or a descendant path. Channels are independent of each other.
 * Liveness uses WebSocket ping/pong control frames in both directions.
 */
import { Either, Schema } from "effect"

export const PROTOCOL_VERSION = 3

/** Payload bytes per binary frame. */
export const CHUNK_BYTES = 1024 * 1024
/** Largest frame the daemon accepts; anything bigger closes the session (1009). */
export const MAX_FRAME_BYTES = CHUNK_BYTES + 64 * 1024
/** Unacknowledged chunk bytes a client may have in flight per channel. */
export const WINDOW_BYTES = 8 * CHUNK_BYTES
/** Unanswered `Write`s and `WriteBatch`es a client may have per channel; the daemon refuses one beyond them. */
export const MAX_OPEN_WRITES = 256
/** Most files in one `WriteBatch`. */
export const MAX_BATCH_FILES = 256
/** Most bytes in one `WriteBatch`: its content is one binary frame. */
export const MAX_BATCH_BYTES = CHUNK_BYTES

const Seq = Schema.Int.pipe(Schema.between(0, 0xffffffff))
/** A channel of the session; absent on the wire means channel 0. */
const Ch = Schema.optionalWith(Schema.Int.pipe(Schema.between(0, 0xffffffff)), { default: () => 0 })
/** A path relative to the session's destination root, `/`-separated. Confinement is checked by the daemon. */
const RelPath = Schema.String
const Mode = Schema.Int.pipe(Schema.between(0, 0o7777))
/** Milliseconds since the epoch. */
const Mtime = Schema.Number

// ---- client → daemon ------------------------------------------------------------------------

export class Hello extends Schema.TaggedClass<Hello>()("Hello", {
  protocolVersion: Schema.Int,
  token: Schema.String,
  clientId: Schema.String
}) {}

/** Opens channel `ch` on a destination root. */
export class Open extends Schema.TaggedClass<Open>()("Open", {
  ch: Ch,
  project: Schema.String,
  /** As configured: absolute, or `~/`-relative to the daemon user's home. */
  destinationRoot: Schema.String
}) {}

/** Ends channel `ch` once what was sent on it has been applied; answered by `Closed`. */
export class Close extends Schema.TaggedClass<Close>()("Close", { ch: Ch }) {}

export class Write extends Schema.TaggedClass<Write>()("Write", {
  ch: Ch,
  seq: Seq,
  path: RelPath,
  size: Schema.Int.pipe(Schema.nonNegative()),
  mode: Mode,
  mtime: Mtime
}) {}

export const BatchFile = Schema.Struct({
  path: RelPath,
  size: Schema.Int.pipe(Schema.nonNegative()),
  mode: Mode,
  mtime: Mtime
})
export type BatchFile = typeof BatchFile.Type

/** Whole small files: file `i` is operation `seq + i`; the bytes of all follow as for one `Write`. */
export class WriteBatch extends Schema.TaggedClass<WriteBatch>()("WriteBatch", {
  ch: Ch,
  seq: Seq,
  files: Schema.Array(BatchFile).pipe(Schema.minItems(1), Schema.maxItems(MAX_BATCH_FILES))
}) {}

/** Cancels a `Write` whose source changed while it was read; the daemon discards the partial file. */
export class Abort extends Schema.TaggedClass<Abort>()("Abort", { ch: Ch, seq: Seq }) {}

export class Mkdir extends Schema.TaggedClass<Mkdir>()("Mkdir", {
  ch: Ch,
  seq: Seq,
  path: RelPath,
  mode: Mode,
  mtime: Schema.optionalWith(Mtime, { exact: true })
}) {}

/** Removes a file, symlink or whole directory tree. Removing a missing path succeeds. */
export class Remove extends Schema.TaggedClass<Remove>()("Remove", { ch: Ch, seq: Seq, path: RelPath }) {}

export class Rename extends Schema.TaggedClass<Rename>()("Rename", { ch: Ch, seq: Seq, from: RelPath, to: RelPath }) {}

export class Symlink extends Schema.TaggedClass<Symlink>()("Symlink", {
  ch: Ch,
  seq: Seq,
  path: RelPath,
  target: Schema.String,
  mtime: Schema.optionalWith(Mtime, { exact: true })
}) {}

/** Asks for the state of the destination tree, for reconciliation. */
export class ListManifest extends Schema.TaggedClass<ListManifest>()("ListManifest", { ch: Ch, seq: Seq }) {}

export const ClientMessage = Schema.Union(Hello, Open, Close, Write, WriteBatch, Abort, Mkdir, Remove, Rename, Symlink, ListManifest)
export type ClientMessage = typeof ClientMessage.Type
export type Operation = Write | WriteBatch | Mkdir | Remove | Rename | Symlink | ListManifest

// ---- daemon → client ------------------------------------------------------------------------

export class Welcome extends Schema.TaggedClass<Welcome>()("Welcome", {
  protocolVersion: Schema.Int,
  daemonVersion: Schema.String,
  sessionId: Schema.String
}) {}

/** The session was refused: nothing more is read from it. */
export const RejectReason = Schema.Literal("protocol-version", "token", "bad-hello")
export class Rejected extends Schema.TaggedClass<Rejected>()("Rejected", {
  reason: RejectReason,
  message: Schema.String
}) {}

export class Opened extends Schema.TaggedClass<Opened>()("Opened", {
  ch: Ch,
  /** The destination root as resolved on the daemon's machine. */
  root: Schema.String
}) {}

/** The channel could not be opened (e.g. its root is unusable); the session goes on. */
export class OpenFailed extends Schema.TaggedClass<OpenFailed>()("OpenFailed", { ch: Ch, message: Schema.String }) {}

/** Everything sent on the channel has been applied and answered; its number is free. */
export class Closed extends Schema.TaggedClass<Closed>()("Closed", { ch: Ch }) {}

/** Operations from `seq` on, `count` of them (the files of a `WriteBatch`), or 1. */
const Count = Schema.optionalWith(Schema.Int.pipe(Schema.between(1, MAX_BATCH_FILES)), { exact: true })

export class Ack extends Schema.TaggedClass<Ack>()("Ack", { ch: Ch, seq: Seq, count: Count }) {}

export const OpErrorCode = Schema.Literal("confinement", "io", "protocol", "aborted")
export type OpErrorCode = typeof OpErrorCode.Type
export class OpFailed extends Schema.TaggedClass<OpFailed>()("OpFailed", {
  ch: Ch,
  seq: Seq,
  code: OpErrorCode,
  message: Schema.String,
  count: Count
}) {}

/** Returns flow-control window: `bytes` of chunk payload have been written to disk. */
export class Credit extends Schema.TaggedClass<Credit>()("Credit", { ch: Ch, bytes: Schema.Int.pipe(Schema.nonNegative()) }) {}

export const EntryType = Schema.Literal("file", "dir", "symlink")
export const ManifestEntry = Schema.Struct({
  path: RelPath,
  type: EntryType,
  size: Schema.Int,
  mtime: Mtime,
  mode: Mode,
  target: Schema.optionalWith(Schema.String, { exact: true })
})
export type ManifestEntry = typeof ManifestEntry.Type

/** One page of a manifest; the last page of a `ListManifest` has `done: true` and is followed by its `Ack`. */
export class Manifest extends Schema.TaggedClass<Manifest>()("Manifest", {
  ch: Ch,
  seq: Seq,
  entries: Schema.Array(ManifestEntry),
  done: Schema.Boolean
}) {}

export const DaemonMessage = Schema.Union(Welcome, Rejected, Opened, OpenFailed, Closed, Ack, OpFailed, Credit, Manifest)
export type DaemonMessage = typeof DaemonMessage.Type

// ---- codecs ---------------------------------------------------------------------------------

export const decodeClientMessage = Schema.decodeUnknownEither(Schema.parseJson(ClientMessage))
const decodeDaemonMessageSchema = Schema.decodeUnknownEither(Schema.parseJson(DaemonMessage))

const isSeq = (n: unknown): n is number => typeof n === "number" && Number.isInteger(n) && n >= 0 && n <= 0xffffffff
const isCount = (n: unknown): n is number => typeof n === "number" && Number.isInteger(n) && n >= 1 && n <= MAX_BATCH_FILES
const ENTRY_TYPES = new Set(["file", "dir", "symlink"])
const isEntry = (e: unknown): e is ManifestEntry => {
  if (typeof e !== "object" || e === null) return false
  const x = e as Record<string, unknown>
  return (
    typeof x.path === "string" &&
    ENTRY_TYPES.has(x.type as string) &&
    Number.isInteger(x.size) &&
    typeof x.mtime === "number" &&
    Number.isInteger(x.mode) &&
    (x.mode as number) >= 0 &&
    (x.mode as number) <= 0o7777 &&
    (x.target === undefined || typeof x.target === "string")
  )
}

/**
 * Acks, Credits and Manifest pages are nearly all of a big sync's replies: they are checked by
 * hand (the same rules as their Schemas; a test holds the two together), everything else and
 * anything doubtful goes through the Schema.
 */
export const decodeDaemonMessage = (text: string): Either.Either<DaemonMessage, unknown> => {
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    return decodeDaemonMessageSchema(text)
  }
  const m = json as Record<string, unknown> | null
  if (m !== null && typeof m === "object" && (m.ch === undefined || isSeq(m.ch))) {
    const keys = Object.keys(m).length - (m.ch === undefined ? 0 : 1)
    const fast =
      (m._tag === "Ack" && isSeq(m.seq) && (keys === 2 || (keys === 3 && isCount(m.count)))) ||
      (m._tag === "Credit" && keys === 2 && Number.isInteger(m.bytes) && (m.bytes as number) >= 0) ||
      (m._tag === "Manifest" && keys === 4 && isSeq(m.seq) && typeof m.done === "boolean" && Array.isArray(m.entries) && m.entries.every(isEntry))
    if (fast) {
      m.ch ??= 0
      return Either.right(m as unknown as Ack | Credit | Manifest)
    }
  }
  return decodeDaemonMessageSchema(text)
}
export const encodeClientMessage = Schema.encodeSync(Schema.parseJson(ClientMessage))
export const encodeDaemonMessage = Schema.encodeSync(Schema.parseJson(DaemonMessage))

/** Bytes before a binary frame's payload: channel and seq. */
export const CHUNK_HEADER_BYTES = 8

/** A binary frame: 4-byte big-endian channel, 4-byte big-endian seq, then payload bytes. */
export const encodeChunk = (ch: number, seq: number, payload: Uint8Array): Buffer => {
  const frame = Buffer.allocUnsafe(CHUNK_HEADER_BYTES + payload.byteLength)
  frame.writeUInt32BE(ch, 0)
  frame.writeUInt32BE(seq, 4)
  frame.set(payload, CHUNK_HEADER_BYTES)
  return frame
}

/** The same in place: `framed` holds the payload after `CHUNK_HEADER_BYTES` it overwrites with the header. */
export const frameChunk = (ch: number, seq: number, framed: Buffer): Buffer => {
  framed.writeUInt32BE(ch, 0)
  framed.writeUInt32BE(seq, 4)
  return framed
}

export const decodeChunk = (frame: Buffer): { readonly ch: number; readonly seq: number; readonly payload: Buffer } | undefined =>
  frame.byteLength < CHUNK_HEADER_BYTES
    ? undefined
    : { ch: frame.readUInt32BE(0), seq: frame.readUInt32BE(4), payload: frame.subarray(CHUNK_HEADER_BYTES) }

// ---- daemon state file ----------------------------------------------------------------------

/** `~/.sicksync/daemon.json` on the daemon's machine, mode 0600. */
export const DaemonState = Schema.Struct({
  port: Schema.Int,
  pid: Schema.Int,
  version: Schema.String,
  protocolVersion: Schema.Int,
  token: Schema.String
})
export type DaemonState = typeof DaemonState.Type

/** The one JSON line `sicksync start-daemon` prints on stdout. */
export const ReadyLine = Schema.Struct({
  port: Schema.Int,
  pid: Schema.Int,
  version: Schema.String,
  protocolVersion: Schema.Int,
  started: Schema.Boolean
})
export type ReadyLine = typeof ReadyLine.Type

/**
 * The client side of the protocol (`openLink`) against a scripted daemon: a raw `ws` server that
 * records every frame it receives and answers as each test says.
 */
import { Effect, Either, Exit } from "effect"
import { Duplex } from "node:stream"
import { afterEach, describe, expect, it } from "vitest"
import { type WebSocket, WebSocketServer } from "ws"
import { CHUNK_HEADER_BYTES, decodeChunk, MAX_BATCH_FILES, PROTOCOL_VERSION, WINDOW_BYTES } from "../src/schemas/Protocol.js"
import { type BufferPool } from "../src/services/bufferPool.js"
import { type FileSource, makeBatchBuffers, openLink, type Session, SourceChanged } from "../src/services/RemoteConnection.js"
import { testDestination, testProject } from "./support/fixtures.js"
import { holdingSocket } from "./support/holdingSocket.js"

type Received = { readonly text: Record<string, any> } | { readonly ch: number; readonly seq: number; readonly payload: Buffer }
type Answer = (message: Record<string, any>, reply: (m: Record<string, unknown>) => void) => void

/** Acks every operation; a batch with one Ack for all its files. */
const ackAll: Answer = (m, reply) => {
  if (m._tag === "WriteBatch") reply({ _tag: "Ack", ch: m.ch, seq: m.seq, count: m.files.length })
  else if (typeof m.seq === "number") reply({ _tag: "Ack", ch: m.ch, seq: m.seq })
}

const servers: Array<WebSocketServer> = []
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => new Promise((resolve) => s.close(resolve))))
})

/** A daemon on 127.0.0.1 that welcomes, opens channels, records and answers with `answer`. */
const scriptedDaemon = async (answer: { current: Answer }, onBytes: (bytes: number) => void = () => undefined) => {
  const received: Array<Received> = []
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 })
  servers.push(server)
  await new Promise((resolve) => server.once("listening", resolve))
  server.on("connection", (ws: WebSocket) => {
    const reply = (m: Record<string, unknown>) => ws.send(JSON.stringify(m))
    ws.on("message", (data: Buffer, isBinary) => {
      if (isBinary) {
        const chunk = decodeChunk(data)!
        onBytes(chunk.payload.byteLength)
        return void received.push(chunk)
      }
      const m = JSON.parse(data.toString("utf8"))
      if (m._tag === "Hello") return reply({ _tag: "Welcome", protocolVersion: PROTOCOL_VERSION, daemonVersion: "test", sessionId: "s" })
      if (m._tag === "Open") return reply({ _tag: "Opened", ch: m.ch, root: "/dest" })
      if (m._tag === "Close") return reply({ _tag: "Closed", ch: m.ch })
      received.push({ text: m })
      answer.current(m, reply)
    })
  })
  const port = (server.address() as { port: number }).port
  return { received, endpoint: { url: `ws://127.0.0.1:${port}`, token: "t" } }
}

/** A small file whose bytes are `content` (or that changed, when `content` is a SourceChanged). */
const small = (path: string, content: Buffer | SourceChanged, mode = 0o644): FileSource => ({
  path,
  size: Buffer.isBuffer(content) ? content.byteLength : 3,
  mode,
  mtime: 1_700_000_000_000,
  readInto: (target, offset) => (Buffer.isBuffer(content) ? content.copy(target, offset) : content),
  read: () => Effect.die("streamed instead of batched")
})

/** Runs `body` with a session on a scripted daemon; returns what it produced and what the daemon received. */
const withSession = async <A>(
  answer: Answer,
  body: (session: Session) => Effect.Effect<A, unknown>,
  onBytes?: (bytes: number) => void,
  createConnection?: (port: number) => Duplex,
  batchBuffers?: BufferPool
) => {
  const script = { current: answer }
  const daemon = await scriptedDaemon(script, onBytes)
  const port = Number(new URL(daemon.endpoint.url).port)
  const endpoint = createConnection === undefined ? daemon.endpoint : { ...daemon.endpoint, createConnection: () => createConnection(port) }
  const result = await Effect.runPromise(
    Effect.scoped(
      Effect.gen(function* () {
        const link = yield* openLink("scripted", endpoint, undefined, batchBuffers)
        const session = yield* link.open(testDestination("d"), testProject("/p"))
        // a reply that never comes fails the test at once, not at its timeout
        return yield* body(session).pipe(Effect.timeout("5 seconds"))
      })
    )
  )
  return { result, received: daemon.received }
}

/** Sends `files` at once (each read into a batch while earlier ones may still be held) and waits for every ack. */
const writeAllSmall = (files: ReadonlyArray<FileSource>) => (session: Session) =>
  Effect.gen(function* () {
    const acks = yield* Effect.forEach(files, (f) => session.writeSmall!(f))
    yield* Effect.all(acks.map((a) => a.wait))
  })

const texts = (received: ReadonlyArray<Received>) => received.map((r) => ("text" in r ? r.text._tag : `bytes ${r.seq} ${r.payload.byteLength}`))

describe("batched small files", () => {
  it("the small files of one turn leave as one WriteBatch and one frame of their bytes, acked together", async () => {
    const files = [small("a", Buffer.from("alpha")), small("d/b", Buffer.alloc(0), 0o755), small("d/c", Buffer.from("charlie"))]
    const { received, result } = await withSession(ackAll, (session) =>
      Effect.gen(function* () {
        const acks = yield* Effect.forEach(files, (f) => session.writeSmall!(f))
        return yield* Effect.all(acks.map((a) => Effect.exit(a.wait)))
      })
    )
    expect(result.every(Exit.isSuccess)).toBe(true)
    expect(texts(received)).toEqual(["WriteBatch", "bytes 1 12"])
    const batch = (received[0] as { text: Record<string, any> }).text
    expect(batch).toMatchObject({ seq: 1, files: [{ path: "a", size: 5, mode: 0o644 }, { path: "d/b", size: 0, mode: 0o755 }, { path: "d/c", size: 7 }] })
    expect((received[1] as { payload: Buffer }).payload.toString()).toBe("alphacharlie")
  })

  it("an operation sent between small files goes after those before it and before those after it", async () => {
    const { received } = await withSession(ackAll, (session) =>
      Effect.gen(function* () {
        const acks = [
          yield* session.writeSmall!(small("a", Buffer.from("1"))),
          yield* session.send({ _tag: "Mkdir", path: "d", mode: 0o755 }),
          yield* session.writeSmall!(small("d/b", Buffer.from("2"))),
          yield* session.writeSmall!(small("d/c", Buffer.from("3")))
        ]
        yield* Effect.all(acks.map((a) => a.wait))
      })
    )
    expect(texts(received)).toEqual(["WriteBatch", "bytes 1 1", "Mkdir", "WriteBatch", "bytes 3 2"])
    expect(received.flatMap((r) => ("text" in r ? [r.text.seq] : []))).toEqual([1, 2, 3])
    // the second batch is cut from the rest of the first one's buffer: each frame carries its own bytes
    expect(received.flatMap((r) => ("text" in r ? [] : [r.payload.toString()]))).toEqual(["1", "23"])
  })

  it("each file's ack answers for it alone, and fails naming its path; a failed batch fails every file", async () => {
    const answer: Answer = (m, reply) => {
      if (m.seq === 1) {
        reply({ _tag: "Ack", ch: m.ch, seq: 1 })
        reply({ _tag: "OpFailed", ch: m.ch, seq: 2, code: "io", message: "disk full" })
        reply({ _tag: "Ack", ch: m.ch, seq: 3 })
      } else reply({ _tag: "OpFailed", ch: m.ch, seq: m.seq, count: m.files.length, code: "aborted", message: "gone" })
    }
    const { result } = await withSession(answer, (session) =>
      Effect.gen(function* () {
        const first = yield* Effect.forEach(["x", "y", "z"], (p) => session.writeSmall!(small(p, Buffer.from(p))))
        const outcomes = yield* Effect.all(first.map((a) => Effect.either(a.wait)))
        yield* Effect.sleep(1) // the next files start a batch of their own
        const second = yield* Effect.forEach(["u", "v"], (p) => session.writeSmall!(small(p, Buffer.from(p))))
        return [...outcomes, ...(yield* Effect.all(second.map((a) => Effect.either(a.wait))))]
      })
    )
    const summary = result.map((o) => (Either.isRight(o) ? "ok" : `${o.left._tag === "OperationFailed" ? o.left.code : o.left._tag} ${"path" in o.left ? o.left.path : ""}`))
    expect(summary).toEqual(["ok", "io y", "ok", "aborted u", "aborted v"])
  })

  it("an ack is done once its answer has come, not before", async () => {
    const { result } = await withSession(ackAll, (session) =>
      Effect.gen(function* () {
        const ack = yield* session.writeSmall!(small("a", Buffer.from("a")))
        const before = ack.done() // the batch has not even left yet
        yield* ack.wait
        return [before, ack.done()]
      })
    )
    expect(result).toEqual([false, true])
  })

  it("a file that changed while read is left out, the others go", async () => {
    const { received, result } = await withSession(ackAll, (session) =>
      Effect.gen(function* () {
        const a = yield* session.writeSmall!(small("a", Buffer.from("aa")))
        const changed = yield* Effect.either(session.writeSmall!(small("b", new SourceChanged({ path: "b" }))))
        const c = yield* session.writeSmall!(small("c", Buffer.from("cc")))
        yield* Effect.all([a.wait, c.wait])
        return changed
      })
    )
    expect(Either.isLeft(result) && result.left._tag).toBe("SourceChanged")
    expect(texts(received)).toEqual(["WriteBatch", "bytes 1 4"])
    expect((received[0] as { text: Record<string, any> }).text.files.map((f: { path: string }) => f.path)).toEqual(["a", "c"])
  })

  it("more bytes than the credit window: the filled batch leaves first, then it waits for credit, never over the window", async () => {
    // Credit only for bytes received, as the daemon gives it: a client waiting on credit with its
    // batch unsent would wait forever. And only once the client can send no more, having filled the
    // window (or sent everything), and a moment later: a client that stopped short of the window
    // would wait forever, and one that ignored it would have gone past it by then. (Not on a timer
    // alone: a loaded machine sends more slowly than any delay chosen for it.)
    const fileBytes = 250 * 1024
    const files = Array.from({ length: 48 }, (_, i) => small(`f${i}`, Buffer.alloc(fileBytes, i)))
    let inFlight = 0
    let maxInFlight = 0
    let sent = 0
    let releasing = false
    const held: Array<() => void> = []
    const answer: Answer = (m, reply) => {
      if (m._tag !== "WriteBatch") return
      const bytes = m.files.reduce((n: number, f: { size: number }) => n + f.size, 0)
      held.push(() => {
        inFlight -= bytes
        reply({ _tag: "Credit", ch: m.ch, bytes })
        reply({ _tag: "Ack", ch: m.ch, seq: m.seq, count: m.files.length })
      })
    }
    const onBytes = (bytes: number) => {
      inFlight += bytes
      sent += bytes
      maxInFlight = Math.max(maxInFlight, inFlight)
      if (releasing || (inFlight + fileBytes <= WINDOW_BYTES && sent < files.length * fileBytes)) return
      releasing = true
      setTimeout(() => {
        releasing = false
        for (const release of held.splice(0)) release()
      }, 20)
    }
    const { received } = await withSession(
      answer,
      writeAllSmall(files),
      onBytes
    )
    const bytes = Buffer.concat(received.flatMap((r) => ("text" in r ? [] : [r.payload])))
    expect(bytes.equals(Buffer.concat(files.map((_, i) => Buffer.alloc(fileBytes, i))))).toBe(true)
    expect(maxInFlight).toBeGreaterThan(WINDOW_BYTES / 2)
    expect(maxInFlight).toBeLessThanOrEqual(WINDOW_BYTES)
  })

  it("a batch holds at most MAX_BATCH_FILES files and one frame of bytes; more start the next one", async () => {
    const many = Array.from({ length: MAX_BATCH_FILES + 10 }, (_, i) => small(`f${i}`, Buffer.alloc(10, i)))
    const large = Array.from({ length: 5 }, (_, i) => small(`big${i}`, Buffer.alloc(200 * 1024, i)))
    const { received } = await withSession(ackAll, writeAllSmall([...many, ...large]))
    const batches = received.flatMap((r) => ("text" in r ? [r.text] : []))
    expect(batches.map((b) => b.files.length)).toEqual([MAX_BATCH_FILES, 10 + 1, 1, 1, 1, 1])
    // every file exactly once, in order, with its own bytes
    expect(batches.flatMap((b) => b.files.map((f: { path: string }) => f.path))).toEqual([...many, ...large].map((f) => f.path))
    for (const r of received) if (!("text" in r)) expect(r.payload.byteLength + CHUNK_HEADER_BYTES).toBeLessThanOrEqual(CHUNK_HEADER_BYTES + 256 * 1024)
    const bytes = Buffer.concat(received.flatMap((r) => ("text" in r ? [] : [r.payload])))
    const expected = Buffer.concat([...many, ...large].map((_, i) => (i < many.length ? Buffer.alloc(10, i) : Buffer.alloc(200 * 1024, i - many.length))))
    expect(bytes.equals(expected)).toBe(true)
  })

  it("a batch's buffer is filled again only once the socket is done with it", async () => {
    // Several files to a buffer, and more buffers (94) than the pool keeps (32).
    const files = Array.from({ length: 400 }, (_, i) => small(`f${i}`, Buffer.alloc(60 * 1024 + i, i % 251)))
    const ackAndCredit: Answer = (m, reply) => {
      reply({ _tag: "Credit", ch: m.ch, bytes: m.files.reduce((n: number, f: { size: number }) => n + f.size, 0) })
      reply({ _tag: "Ack", ch: m.ch, seq: m.seq, count: m.files.length })
    }
    // A buffer given back is spoiled at once: one still being written would send the spoiled bytes.
    const pool = makeBatchBuffers()
    let given = 0
    const spoiling: BufferPool = { ...pool, give: (b) => (given++, b.fill(0xee), pool.give(b)) }
    const { received } = await withSession(
      ackAndCredit,
      writeAllSmall(files),
      undefined,
      // every write held a while: a buffer filled again before its write is done goes out with other bytes
      (port) => holdingSocket(port, 5),
      spoiling
    )
    expect(given).toBeGreaterThan(10)
    const bytes = Buffer.concat(received.flatMap((r) => ("text" in r ? [] : [r.payload])))
    expect(bytes.equals(Buffer.concat(files.map((_, i) => Buffer.alloc(60 * 1024 + i, i % 251))))).toBe(true)
  })
})

/**
 * A small raw-`ws` client for the daemon protocol, for tests. Promise-based on purpose: it talks to a
 * daemon running in-process or as a subprocess and keeps every message it received.
 *
 *   const client = await DaemonClient.connect(port)
 *   const opened = await client.helloAndOpen({ token, destinationRoot: "~/dest" }) // channel 0
 *   const reply = await client.write(1, "a.txt", Buffer.from("hi"), { mode: 0o644 })
 *
 * Operations sent without a `ch` go to channel 0; replies are matched by seq alone, so a test that
 * opens several channels gives their operations distinct seqs.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import WebSocket from "ws"
import {
  type ClientMessage,
  CHUNK_BYTES,
  type DaemonMessage,
  DaemonState,
  decodeDaemonMessage,
  encodeChunk,
  encodeClientMessage,
  Hello,
  ListManifest,
  Open,
  type ManifestEntry,
  PROTOCOL_VERSION,
  WINDOW_BYTES,
  Write,
  WriteBatch
} from "../../src/schemas/Protocol.js"
import { Either, Schema } from "effect"

type Tag = DaemonMessage["_tag"]
type Of<T extends Tag> = Extract<DaemonMessage, { readonly _tag: T }>
export type Reply = Of<"Ack"> | Of<"OpFailed">

export interface Closed {
  readonly code: number
  readonly reason: string
}

interface Waiter {
  readonly match: (m: DaemonMessage) => boolean
  readonly resolve: (m: DaemonMessage) => void
  readonly reject: (e: Error) => void
}

export class DaemonClient {
  /** Every message received, in order (Credits included). */
  readonly received: Array<DaemonMessage> = []
  /** Text frames that did not decode as a DaemonMessage. */
  readonly undecodable: Array<string> = []
  /** Received and not yet taken by `take` (Credits are counted, not queued). */
  private readonly inbox: Array<DaemonMessage> = []
  private readonly waiters: Array<Waiter> = []
  private readonly creditWaiters: Array<() => void> = []
  creditBytes = 0
  sentChunkBytes = 0
  maxInFlight = 0
  closeInfo: Closed | undefined
  readonly closed: Promise<Closed>

  private constructor(readonly ws: WebSocket) {
    this.closed = new Promise((resolve) => {
      ws.on("close", (code, reason) => {
        this.closeInfo = { code, reason: reason.toString() }
        for (const w of this.waiters.splice(0)) w.reject(new Error(`connection closed (${code} ${reason.toString()})`))
        for (const w of this.creditWaiters.splice(0)) w()
        resolve(this.closeInfo)
      })
    })
    ws.on("error", () => undefined)
    ws.on("message", (data, isBinary) => {
      if (isBinary) return
      const text = data.toString()
      const decoded = decodeDaemonMessage(text)
      if (Either.isLeft(decoded)) {
        this.undecodable.push(text)
        return
      }
      const message = decoded.right
      this.received.push(message)
      if (message._tag === "Credit") {
        this.creditBytes += message.bytes
        for (const w of this.creditWaiters.splice(0)) w()
        return
      }
      const i = this.waiters.findIndex((w) => w.match(message))
      if (i >= 0) this.waiters.splice(i, 1)[0]!.resolve(message)
      else this.inbox.push(message)
    })
  }

  static connect(port: number, options?: { readonly autoPong?: boolean }): Promise<DaemonClient> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}`, { autoPong: options?.autoPong ?? true, maxPayload: 256 * 1024 * 1024 })
      const client = new DaemonClient(ws)
      ws.once("open", () => resolve(client))
      ws.once("error", reject)
    })
  }

  get isOpen(): boolean {
    return this.ws.readyState === WebSocket.OPEN
  }

  send(message: ClientMessage): void {
    this.ws.send(encodeClientMessage(message))
  }

  sendRaw(data: string | Uint8Array): void {
    this.ws.send(data, { binary: typeof data !== "string" })
  }

  sendChunk(seq: number, payload: Uint8Array, ch = 0): void {
    this.sentChunkBytes += payload.byteLength
    this.maxInFlight = Math.max(this.maxInFlight, this.sentChunkBytes - this.creditBytes)
    this.ws.send(encodeChunk(ch, seq, payload), { binary: true })
  }

  /** The first not-yet-taken message matching `match`, waiting up to `timeoutMs`. */
  take(match: (m: DaemonMessage) => boolean = () => true, timeoutMs = 5_000): Promise<DaemonMessage> {
    const i = this.inbox.findIndex(match)
    if (i >= 0) return Promise.resolve(this.inbox.splice(i, 1)[0]!)
    if (this.closeInfo !== undefined) {
      return Promise.reject(new Error(`connection closed (${this.closeInfo.code} ${this.closeInfo.reason})`))
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const j = this.waiters.indexOf(waiter)
        if (j >= 0) this.waiters.splice(j, 1)
        reject(new Error(`no matching message within ${timeoutMs} ms; received: ${JSON.stringify(this.received.slice(-5))}`))
      }, timeoutMs)
      const waiter: Waiter = {
        match,
        resolve: (m) => {
          clearTimeout(timer)
          resolve(m)
        },
        reject: (e) => {
          clearTimeout(timer)
          reject(e)
        }
      }
      this.waiters.push(waiter)
    })
  }

  takeTag<T extends Tag>(tag: T, timeoutMs?: number): Promise<Of<T>> {
    return this.take((m) => m._tag === tag, timeoutMs) as Promise<Of<T>>
  }

  /** The Ack or OpFailed for `seq`. */
  reply(seq: number, timeoutMs?: number): Promise<Reply> {
    return this.take((m) => (m._tag === "Ack" || m._tag === "OpFailed") && m.seq === seq, timeoutMs) as Promise<Reply>
  }

  /** Sends a Hello (fields overridable) and returns the Welcome or Rejected. */
  hello(fields: Partial<ConstructorParameters<typeof Hello>[0]> & { readonly token: string }) {
    this.send(new Hello({ protocolVersion: PROTOCOL_VERSION, clientId: "test-client", ...fields }))
    return this.take((m) => m._tag === "Welcome" || m._tag === "Rejected") as Promise<Of<"Welcome"> | Of<"Rejected">>
  }

  /** Opens channel `ch` on `destinationRoot` and returns the Opened or OpenFailed. */
  open(destinationRoot: string, ch = 0) {
    this.send(new Open({ ch, project: "test-project", destinationRoot }))
    return this.take((m) => (m._tag === "Opened" || m._tag === "OpenFailed") && m.ch === ch) as Promise<Of<"Opened"> | Of<"OpenFailed">>
  }

  /** Hello, then channel 0 on `destinationRoot`: the Opened, or whichever refusal came first. */
  async helloAndOpen(fields: Partial<ConstructorParameters<typeof Hello>[0]> & { readonly token: string; readonly destinationRoot: string }) {
    const { destinationRoot, ...hello } = fields
    const welcome = await this.hello(hello)
    return welcome._tag === "Rejected" ? welcome : this.open(destinationRoot)
  }

  /** Sends an operation and waits for its reply. */
  op(message: ClientMessage & { readonly seq: number }, timeoutMs?: number): Promise<Reply> {
    this.send(message)
    return this.reply(message.seq, timeoutMs)
  }

  private waitForWindow(bytes: number, window: number): Promise<void> {
    if (this.sentChunkBytes - this.creditBytes + bytes <= window || this.closeInfo !== undefined) return Promise.resolve()
    return new Promise<void>((resolve) => this.creditWaiters.push(resolve)).then(() => this.waitForWindow(bytes, window))
  }

  /** Sends the Write header (unless `header: false`) and the chunks, keeping at most `window` bytes in flight. */
  async writeChunks(
    seq: number,
    content: Uint8Array,
    options?: { readonly chunkBytes?: number; readonly window?: number; readonly stopAfter?: number; readonly ch?: number }
  ): Promise<void> {
    const chunkBytes = options?.chunkBytes ?? CHUNK_BYTES
    const window = options?.window ?? WINDOW_BYTES
    const stopAfter = options?.stopAfter ?? content.byteLength
    for (let offset = 0; offset < Math.min(content.byteLength, stopAfter); offset += chunkBytes) {
      const payload = content.subarray(offset, Math.min(offset + chunkBytes, content.byteLength, stopAfter))
      // Checked again right before sending: several writers may wait at once, and each must see the
      // bytes the others sent once they were woken.
      while (this.sentChunkBytes - this.creditBytes + payload.byteLength > window && this.closeInfo === undefined) {
        await this.waitForWindow(payload.byteLength, window)
      }
      if (!this.isOpen) return
      this.sendChunk(seq, payload, options?.ch)
    }
  }

  /**
   * Sends a whole Write (header and chunks, within the window) without waiting for its reply, as a
   * pipelining client does; resolves once every byte is on the wire. Take the reply with `reply(seq)`.
   */
  async pipelineWrite(
    seq: number,
    filePath: string,
    content: Uint8Array,
    options?: { readonly mode?: number; readonly mtime?: number; readonly chunkBytes?: number; readonly window?: number; readonly ch?: number }
  ): Promise<void> {
    const ch = options?.ch ?? 0
    this.send(
      new Write({ ch, seq, path: filePath, size: content.byteLength, mode: options?.mode ?? 0o644, mtime: options?.mtime ?? Date.now() })
    )
    await this.writeChunks(seq, content, options)
  }

  /**
   * Sends a `WriteBatch` of `files` (file `i` is operation `seq + i`) and their bytes in one frame, or in
   * frames of `chunkBytes`. Take the replies with `reply(seq)`.
   */
  writeBatch(
    seq: number,
    files: ReadonlyArray<{ readonly path: string; readonly content: Uint8Array; readonly mode?: number; readonly mtime?: number }>,
    options?: { readonly chunkBytes?: number }
  ): void {
    this.send(
      new WriteBatch({
        seq,
        files: files.map((f) => ({ path: f.path, size: f.content.byteLength, mode: f.mode ?? 0o644, mtime: f.mtime ?? Date.now() }))
      })
    )
    const bytes = Buffer.concat(files.map((f) => f.content))
    const chunkBytes = options?.chunkBytes ?? CHUNK_BYTES
    for (let offset = 0; offset < bytes.byteLength; offset += chunkBytes) this.sendChunk(seq, bytes.subarray(offset, offset + chunkBytes))
  }

  /** The replies for `seqs`, in the order given (they may have arrived in any order). */
  replies(seqs: Iterable<number>, timeoutMs?: number): Promise<Array<Reply>> {
    return Promise.all([...seqs].map((seq) => this.reply(seq, timeoutMs)))
  }

  /** Writes a whole file with flow control and returns the reply. */
  async write(
    seq: number,
    filePath: string,
    content: Uint8Array,
    options?: { readonly mode?: number; readonly mtime?: number; readonly chunkBytes?: number; readonly window?: number }
  ): Promise<Reply> {
    this.send(
      new Write({ seq, path: filePath, size: content.byteLength, mode: options?.mode ?? 0o644, mtime: options?.mtime ?? Date.now() })
    )
    await this.writeChunks(seq, content, options)
    return this.reply(seq, 30_000)
  }

  /** Lists the manifest: all pages, then the reply. */
  async listManifest(seq: number): Promise<{ entries: Array<ManifestEntry>; pages: Array<Of<"Manifest">>; reply: Reply }> {
    this.send(new ListManifest({ seq }))
    const pages: Array<Of<"Manifest">> = []
    while (true) {
      const page = (await this.take((m) => m._tag === "Manifest" && m.seq === seq, 10_000)) as Of<"Manifest">
      pages.push(page)
      if (page.done) break
    }
    const reply = await this.reply(seq)
    return { entries: pages.flatMap((p) => [...p.entries]), pages, reply }
  }

  close(): Promise<Closed> {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) this.ws.close(1000)
    return this.closed
  }

  terminate(): Promise<Closed> {
    this.ws.terminate()
    return this.closed
  }
}

const decodeState = Schema.decodeUnknownEither(Schema.parseJson(DaemonState))

/** `<home>/.sicksync/daemon.json`, or undefined when missing or invalid. */
export const readDaemonState = (home: string): DaemonState | undefined => {
  try {
    return Either.getOrUndefined(decodeState(fs.readFileSync(path.join(home, ".sicksync", "daemon.json"), "utf8")))
  } catch {
    return undefined
  }
}

/** Polls `check` until it returns a value other than undefined/false, or fails after `timeoutMs`. */
export const eventually = async <A>(
  check: () => A | undefined | false | Promise<A | undefined | false>,
  timeoutMs = 5_000,
  what = "condition"
): Promise<A> => {
  const deadline = Date.now() + timeoutMs
  while (true) {
    const value = await check()
    if (value !== undefined && value !== false) return value
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 20))
  }
}

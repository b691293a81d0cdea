/**
 * The daemon, in-process on a free port with a temporary HOME, spoken to with a raw ws client.
 * `start-daemon` and `daemon` run as child processes from a bundle of just those two commands, built
 * into a temp dir (so these tests do not depend on the rest of the CLI building).
 */
import { Cause, Effect, Exit, Fiber, Logger } from "effect"
import { execFile, spawn } from "node:child_process"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import {
  type DaemonOptions,
  decodeClientMessageFast,
  encodeAck,
  encodeCredit,
  encodeManifestPage,
  runDaemon
} from "../src/programs/daemon.js"
import {
  Abort,
  Ack,
  CHUNK_BYTES,
  Close,
  Credit,
  type DaemonMessage,
  decodeClientMessage,
  encodeDaemonMessage,
  Manifest,
  MAX_BATCH_FILES,
  MAX_FRAME_BYTES,
  Mkdir,
  PROTOCOL_VERSION,
  Remove,
  Rename,
  Symlink,
  Write,
  WriteBatch
} from "../src/schemas/Protocol.js"
import * as DestinationFs from "../src/services/DestinationFs.js"
import { VERSION } from "../src/version.js"
import { DaemonClient, eventually, readDaemonState } from "./support/daemonClient.js"
import { tempDirs } from "./support/fixtures.js"

const tempDir = tempDirs("sicksync-daemon-")

interface RunningDaemon {
  readonly home: string
  readonly port: number
  readonly token: string
  readonly pid: number
  readonly fiber: Fiber.RuntimeFiber<void, unknown>
  readonly logs: Array<string>
}

const startDaemon = async (options: Partial<DaemonOptions> & { readonly home: string }): Promise<RunningDaemon> => {
  const logs: Array<string> = []
  const logger = Logger.make(({ message }) => {
    logs.push(Array.isArray(message) ? message.join(" ") : String(message))
  })
  const fiber = Effect.runFork(
    runDaemon({ port: 0, graceMs: 60_000, ...options }).pipe(
      Effect.provide(DestinationFs.layer({ home: options.home })),
      Effect.provide(Logger.replace(Logger.defaultLogger, logger))
    )
  )
  const state = await eventually(() => {
    const exit = fiber.unsafePoll()
    if (exit !== null) throw new Error(`daemon exited early: ${Exit.isFailure(exit) ? Cause.pretty(exit.cause) : "success"}`)
    return readDaemonState(options.home)
  }, 5_000, "daemon.json")
  return { home: options.home, port: state.port, token: state.token, pid: state.pid, fiber, logs }
}

const sha = (b: Uint8Array) => crypto.createHash("sha256").update(b).digest("hex")
const listTemps = (dir: string) => fs.readdirSync(dir).filter((n) => n.includes(".sicksync-"))

// ---- one shared daemon for the protocol tests --------------------------------------------------

let daemon: RunningDaemon
let rootCounter = 0

beforeAll(async () => {
  daemon = await startDaemon({ home: tempDir() })
})

afterAll(async () => {
  await Effect.runPromise(Fiber.interrupt(daemon.fiber))
  // interrupting runs the finalizers: state file and lock are gone
  expect(fs.existsSync(path.join(daemon.home, ".sicksync", "daemon.json"))).toBe(false)
  expect(fs.existsSync(path.join(daemon.home, ".sicksync", "daemon.lock"))).toBe(false)
  // the token never appeared in a log line
  expect(daemon.logs.some((l) => l.includes(daemon.token))).toBe(false)
})

/** A fresh authenticated session on a fresh root `~/dest-N`; returns the client and the root's path. */
const openSession = async () => {
  const name = `dest-${++rootCounter}`
  const client = await DaemonClient.connect(daemon.port)
  const opened = await client.helloAndOpen({ token: daemon.token, destinationRoot: `~/${name}` })
  expect(opened._tag).toBe("Opened")
  return { client, root: path.join(daemon.home, name) }
}

const expectFailed = (reply: { _tag: string }, code: string) => expect(reply).toMatchObject({ _tag: "OpFailed", code })

/**
 * A second, healthy session on its own root, open while another client misbehaves: `check` asserts
 * it still gets its writes acked and applied (one client's bad input never affects another's session).
 */
const bystander = async () => {
  const s = await openSession()
  let seq = 100
  return {
    ...s,
    check: async () => {
      const n = ++seq
      expect(await s.client.write(n, `ok-${n}.txt`, Buffer.from(`hello ${n}`))).toMatchObject({ _tag: "Ack", seq: n })
      expect(fs.readFileSync(path.join(s.root, `ok-${n}.txt`), "utf8")).toBe(`hello ${n}`)
    }
  }
}

/** Sends a raw frame and returns the first message in answer. */
const raw = (data: string | Uint8Array) => (c: DaemonClient) => {
  c.sendRaw(data)
  return c.take()
}

describe("state and handshake", () => {
  it("writes daemon.json 0600 in a 0700 ~/.sicksync, with a lock holding the pid", () => {
    const dir = path.join(daemon.home, ".sicksync")
    expect(fs.statSync(dir).mode & 0o777).toBe(0o700)
    const statePath = path.join(dir, "daemon.json")
    expect(fs.statSync(statePath).mode & 0o777).toBe(0o600)
    const state = readDaemonState(daemon.home)!
    expect(state).toMatchObject({ pid: process.pid, version: VERSION, protocolVersion: PROTOCOL_VERSION })
    expect(state.token).toMatch(/^[0-9a-f]{64}$/)
    expect(fs.readFileSync(path.join(dir, "daemon.lock"), "utf8").trim()).toBe(String(process.pid))
    expect(fs.readdirSync(dir).filter((n) => n.endsWith(".tmp"))).toEqual([])
  })

  it("welcomes a Hello with the right token; opens channels on roots, creating them", async () => {
    const client = await DaemonClient.connect(daemon.port)
    expect(await client.hello({ token: daemon.token })).toMatchObject({
      _tag: "Welcome",
      protocolVersion: PROTOCOL_VERSION,
      daemonVersion: VERSION
    })
    expect(await client.open("~/projects/web")).toMatchObject({ _tag: "Opened", ch: 0, root: path.join(daemon.home, "projects/web") })
    expect(fs.statSync(path.join(daemon.home, "projects/web")).isDirectory()).toBe(true)
    const abs = path.join(daemon.home, "abs-root")
    expect(await client.open(abs, 1)).toMatchObject({ _tag: "Opened", ch: 1, root: abs })
    await client.close()
  })

  it("serves several channels on one session, each applied on its own root; Close answers Closed after the last reply", async () => {
    const client = await DaemonClient.connect(daemon.port)
    await client.hello({ token: daemon.token })
    const roots = ["~/multi-a", "~/multi-b", "~/multi-c"]
    for (const [ch, root] of roots.entries()) expect((await client.open(root, ch))._tag).toBe("Opened")
    // the same relative path on every channel, interleaved, seqs distinct across channels
    const seqs: Array<number> = []
    for (let i = 0; i < 20; i++) {
      for (const ch of [0, 1, 2]) {
        const seq = 1000 * (ch + 1) + i
        seqs.push(seq)
        const content = Buffer.from(`ch ${ch} file ${i}`)
        client.send(new Write({ ch, seq, path: `dir/f${i}.txt`, size: content.byteLength, mode: 0o644, mtime: Date.now() }))
        client.sendChunk(seq, content, ch)
      }
    }
    const replies = await client.replies(seqs)
    expect(replies.every((r) => r._tag === "Ack")).toBe(true)
    for (const [ch, root] of roots.entries()) {
      const dir = path.join(daemon.home, root.slice(2), "dir")
      expect(fs.readdirSync(dir).length).toBe(20)
      expect(fs.readFileSync(path.join(dir, "f7.txt"), "utf8")).toBe(`ch ${ch} file 7`)
    }
    expect(replies.every((r) => r.ch === Math.floor(r.seq / 1000) - 1)).toBe(true)
    // Close right behind a write of several chunks: the write is applied and answered first
    const big = Buffer.alloc(3 * CHUNK_BYTES + 5, 7)
    await client.pipelineWrite(5000, "big.bin", big, { ch: 1 })
    client.send(new Close({ ch: 1 }))
    expect(await client.op(new Mkdir({ ch: 2, seq: 5001, path: "meanwhile", mode: 0o755 }))).toMatchObject({ _tag: "Ack", ch: 2 })
    const order = await Promise.all([client.reply(5000), client.takeTag("Closed")])
    expect(order[0]).toMatchObject({ _tag: "Ack", ch: 1 })
    expect(order[1]).toMatchObject({ ch: 1 })
    const indexOf = (m: DaemonMessage) => client.received.indexOf(m)
    expect(indexOf(order[0])).toBeLessThan(indexOf(order[1]))
    expect(fs.readFileSync(path.join(daemon.home, "multi-b", "big.bin")).equals(big)).toBe(true)
    // the session and its other channels go on
    expect(await client.op(new Mkdir({ ch: 0, seq: 5002, path: "after", mode: 0o755 }))).toMatchObject({ _tag: "Ack", ch: 0 })
    await client.close()
  })

  /**
   * `say` opens the conversation and returns the daemon's first answer: it must be a `Rejected` with
   * `reason`, followed by a 1008 close, while a bystander session keeps working.
   */
  const rejected = async (say: (c: DaemonClient) => Promise<DaemonMessage>, reason: string) => {
    const other = await bystander()
    const client = await DaemonClient.connect(daemon.port)
    expect(await say(client)).toMatchObject({ _tag: "Rejected", reason })
    expect((await client.closed).code).toBe(1008)
    await other.check()
    await other.client.close()
  }

  it("rejects a missing token", () =>
    rejected(
      raw(JSON.stringify({ _tag: "Hello", protocolVersion: PROTOCOL_VERSION, clientId: "x", project: "p", destinationRoot: "~/x" })),
      "token"
    ))

  it("rejects a wrong token (same length and other length)", async () => {
    const wrong = daemon.token.slice(0, -1) + (daemon.token.endsWith("0") ? "1" : "0")
    await rejected((c) => c.hello({ token: wrong }), "token")
    await rejected((c) => c.hello({ token: "short" }), "token")
    await rejected((c) => c.hello({ token: "" }), "token")
    await rejected((c) => c.hello({ token: daemon.token + "00" }), "token")
  })

  it("rejects another protocol version", () => rejected((c) => c.hello({ token: daemon.token, protocolVersion: 99 }), "protocol-version"))

  it("rejects a first message that is not a Hello", async () => {
    await rejected(
      (c) => {
        c.send(new Mkdir({ seq: 1, path: "a", mode: 0o755 }))
        return c.take()
      },
      "bad-hello"
    )
    await rejected(raw("not json"), "bad-hello")
    await rejected(raw(Buffer.from([0, 0, 0, 1, 2])), "bad-hello")
  })

  it("refuses to open roots that are /, the home directory, relative, or above home", async () => {
    const linkToHome = path.join(daemon.home, "..", path.basename(daemon.home) + "-link")
    fs.symlinkSync(daemon.home, linkToHome)
    try {
      for (const destinationRoot of ["/", "~", "~/", daemon.home, linkToHome, "relative/dir", "./x", "~/..", "/..", "~/a\0b"]) {
        const other = await bystander()
        const client = await DaemonClient.connect(daemon.port)
        await client.hello({ token: daemon.token })
        expect(await client.open(destinationRoot, 3), destinationRoot).toMatchObject({ _tag: "OpenFailed", ch: 3 })
        // the session goes on: another channel opens on it
        expect((await client.open(`~/fine-${++rootCounter}`, 4))._tag).toBe("Opened")
        await other.check()
        await other.client.close()
        await client.close()
      }
    } finally {
      fs.unlinkSync(linkToHome)
    }
  })

  it("closes a connection that sends no Hello within the timeout", async () => {
    const home = tempDir()
    const d = await startDaemon({ home, helloTimeoutMs: 200 })
    const client = await DaemonClient.connect(d.port)
    expect((await client.closed).code).toBe(1008)
    await Effect.runPromise(Fiber.interrupt(d.fiber))
  })
})

describe("operations", () => {
  it("writes a small file with mode and mtime", async () => {
    const { client, root } = await openSession()
    const mtime = Date.UTC(2020, 0, 2, 3, 4, 5, 678)
    expect(await client.write(1, "bin/run.sh", Buffer.from("#!/bin/sh\necho hi\n"), { mode: 0o755, mtime })).toMatchObject({
      _tag: "Ack",
      seq: 1
    })
    const file = path.join(root, "bin/run.sh")
    // stat before reading: reading the file moves its atime (relatime), which is not the daemon's doing
    const st = fs.statSync(file)
    expect(st.mode & 0o7777).toBe(0o755)
    expect(Math.abs(st.mtimeMs - mtime)).toBeLessThan(1)
    expect(Math.abs(st.atimeMs - mtime)).toBeLessThan(1)
    expect(fs.readFileSync(file, "utf8")).toBe("#!/bin/sh\necho hi\n")
    // overwrite keeps atomic rename semantics and applies the new mode
    expect(await client.write(2, "bin/run.sh", Buffer.from("v2"), { mode: 0o600 })).toMatchObject({ _tag: "Ack" })
    expect(fs.readFileSync(file, "utf8")).toBe("v2")
    expect(fs.statSync(file).mode & 0o7777).toBe(0o600)
    expect(listTemps(path.join(root, "bin"))).toEqual([])
    await client.close()
  })

  it("a write the filesystem refuses is answered OpFailed io, naming the path, and the session goes on", async () => {
    const { client, root } = await openSession()
    const long = "x".repeat(300) // longer than a name may be
    const reply = await client.write(1, `d/${long}`, Buffer.from("small"))
    expectFailed(reply, "io")
    expect(reply).toMatchObject({ message: expect.stringContaining("ENAMETOOLONG") })
    expect(reply).toMatchObject({ message: expect.stringContaining(`d/${long}`) })
    expect(await client.write(2, "d/fine.txt", Buffer.from("ok"))).toMatchObject({ _tag: "Ack", seq: 2 })
    expect(fs.readdirSync(path.join(root, "d"))).toEqual(["fine.txt"])
    await client.close()
  })

  it("writes an empty file and a binary file with every byte value", async () => {
    const { client, root } = await openSession()
    expect(await client.write(1, "empty", Buffer.alloc(0))).toMatchObject({ _tag: "Ack" })
    expect(fs.readFileSync(path.join(root, "empty")).byteLength).toBe(0)
    const bytes = Buffer.alloc(256 * 4)
    for (let i = 0; i < bytes.byteLength; i++) bytes[i] = i % 256
    expect(await client.write(2, "all-bytes.bin", bytes, { chunkBytes: 100 })).toMatchObject({ _tag: "Ack" })
    expect(Buffer.compare(fs.readFileSync(path.join(root, "all-bytes.bin")), bytes)).toBe(0)
    await client.close()
  })

  it("streams a multi-chunk file with Credit flow control", async () => {
    const { client, root } = await openSession()
    const content = crypto.randomBytes(5 * 1024 * 1024 + 123)
    const window = 1024 * 1024
    const reply = await client.write(1, "big/blob.bin", content, { chunkBytes: 256 * 1024, window })
    expect(reply).toMatchObject({ _tag: "Ack", seq: 1 })
    expect(sha(fs.readFileSync(path.join(root, "big/blob.bin")))).toBe(sha(content))
    // every chunk byte was credited back, and the window was respected (so credits did flow mid-file)
    await eventually(() => client.creditBytes === content.byteLength, 5_000, "all credits")
    expect(client.maxInFlight).toBeLessThanOrEqual(window)
    expect(client.received.filter((m) => m._tag === "Credit").length).toBeGreaterThan(5)
    // the Ack came after the last Credit
    const lastCredit = client.received.map((m) => m._tag).lastIndexOf("Credit")
    const ack = client.received.findIndex((m) => m._tag === "Ack" && m.seq === 1)
    expect(ack).toBeGreaterThan(lastCredit)
    await client.close()
  })

  it("replaces a directory with a file, and a file with a directory", async () => {
    const { client, root } = await openSession()
    fs.mkdirSync(path.join(root, "thing/sub"), { recursive: true })
    fs.writeFileSync(path.join(root, "thing/sub/f"), "x")
    expect(await client.write(1, "thing", Buffer.from("now a file"))).toMatchObject({ _tag: "Ack" })
    expect(fs.readFileSync(path.join(root, "thing"), "utf8")).toBe("now a file")
    expect(await client.op(new Mkdir({ seq: 2, path: "thing", mode: 0o750 }))).toMatchObject({ _tag: "Ack" })
    expect(fs.statSync(path.join(root, "thing")).isDirectory()).toBe(true)
    expect(fs.statSync(path.join(root, "thing")).mode & 0o777).toBe(0o750)
    await client.close()
  })

  it("mkdir -p with mode and mtime, remove file, remove tree, remove missing", async () => {
    const { client, root } = await openSession()
    const mtime = Date.UTC(2021, 5, 6)
    expect(await client.op(new Mkdir({ seq: 1, path: "a/b/c", mode: 0o700, mtime }))).toMatchObject({ _tag: "Ack" })
    const st = fs.statSync(path.join(root, "a/b/c"))
    expect(st.isDirectory()).toBe(true)
    expect(st.mode & 0o777).toBe(0o700)
    expect(Math.abs(st.mtimeMs - mtime)).toBeLessThan(1)
    expect(await client.op(new Mkdir({ seq: 2, path: "a/b/c", mode: 0o755 }))).toMatchObject({ _tag: "Ack" })
    expect(fs.statSync(path.join(root, "a/b/c")).mode & 0o777).toBe(0o755)

    await client.write(3, "a/b/c/file.txt", Buffer.from("x"))
    expect(await client.op(new Remove({ seq: 4, path: "a/b/c/file.txt" }))).toMatchObject({ _tag: "Ack" })
    expect(fs.existsSync(path.join(root, "a/b/c/file.txt"))).toBe(false)
    await client.write(5, "a/b/c/deep/er.txt", Buffer.from("x"))
    expect(await client.op(new Remove({ seq: 6, path: "a" }))).toMatchObject({ _tag: "Ack" })
    expect(fs.existsSync(path.join(root, "a"))).toBe(false)
    expect(await client.op(new Remove({ seq: 7, path: "never/was/here" }))).toMatchObject({ _tag: "Ack" })
    expect(fs.existsSync(root)).toBe(true)
    await client.close()
  })

  it("renames, creating the target's parents and replacing a directory there", async () => {
    const { client, root } = await openSession()
    await client.write(1, "old.txt", Buffer.from("content"))
    expect(await client.op(new Rename({ seq: 2, from: "old.txt", to: "new/place/new.txt" }))).toMatchObject({ _tag: "Ack" })
    expect(fs.existsSync(path.join(root, "old.txt"))).toBe(false)
    expect(fs.readFileSync(path.join(root, "new/place/new.txt"), "utf8")).toBe("content")
    fs.mkdirSync(path.join(root, "dir/inner"), { recursive: true })
    expect(await client.op(new Rename({ seq: 3, from: "new/place/new.txt", to: "dir" }))).toMatchObject({ _tag: "Ack" })
    expect(fs.readFileSync(path.join(root, "dir"), "utf8")).toBe("content")
    expectFailed(await client.op(new Rename({ seq: 4, from: "missing", to: "x" })), "io")
    await client.close()
  })

  it("creates symlinks with the target stored as-is, replacing what is there", async () => {
    const { client, root } = await openSession()
    const outside = tempDir()
    expect(await client.op(new Symlink({ seq: 1, path: "links/out", target: outside }))).toMatchObject({ _tag: "Ack" })
    expect(fs.readlinkSync(path.join(root, "links/out"))).toBe(outside)
    await client.write(2, "links/file", Buffer.from("x"))
    expect(await client.op(new Symlink({ seq: 3, path: "links/file", target: "../../../etc/passwd" }))).toMatchObject({
      _tag: "Ack"
    })
    expect(fs.readlinkSync(path.join(root, "links/file"))).toBe("../../../etc/passwd")
    // replacing a link replaces the link, never writes through it
    expect(await client.write(4, "links/out", Buffer.from("a file now"))).toMatchObject({ _tag: "Ack" })
    expect(fs.lstatSync(path.join(root, "links/out")).isFile()).toBe(true)
    expect(fs.readdirSync(outside)).toEqual([])
    // removing a link to a directory removes the link, not the directory's content
    fs.writeFileSync(path.join(outside, "keep"), "keep")
    await client.op(new Symlink({ seq: 5, path: "links/dirlink", target: outside }))
    expect(await client.op(new Remove({ seq: 6, path: "links/dirlink" }))).toMatchObject({ _tag: "Ack" })
    expect(fs.readFileSync(path.join(outside, "keep"), "utf8")).toBe("keep")
    expect(listTemps(path.join(root, "links"))).toEqual([])
    await client.close()
  })

  it("lists the manifest in pages of at most 1000, skipping temp files", async () => {
    const { client, root } = await openSession()
    fs.mkdirSync(path.join(root, "many/sub"), { recursive: true })
    for (let i = 0; i < 1500; i++) fs.writeFileSync(path.join(root, "many", `f${i}`), "")
    fs.writeFileSync(path.join(root, "many/sub/x.txt"), "12345")
    fs.chmodSync(path.join(root, "many/sub/x.txt"), 0o640)
    fs.symlinkSync("../elsewhere", path.join(root, "many/link"))
    fs.writeFileSync(path.join(root, "many/.x.txt.sicksync-0123456789abcdef.tmp"), "partial")
    const { entries, pages, reply } = await client.listManifest(7)
    expect(reply).toMatchObject({ _tag: "Ack", seq: 7 })
    expect(pages.length).toBeGreaterThanOrEqual(2)
    for (const page of pages) expect(page.entries.length).toBeLessThanOrEqual(1000)
    expect(pages.map((p) => p.done)).toEqual([...pages.slice(1).map(() => false), true])
    expect(entries.length).toBe(1500 + 4) // many, many/sub, many/sub/x.txt, many/link + the files
    const byPath = new Map(entries.map((e) => [e.path, e]))
    expect(byPath.get("many")).toMatchObject({ type: "dir" })
    expect(byPath.get("many/sub/x.txt")).toMatchObject({ type: "file", size: 5, mode: 0o640 })
    expect(byPath.get("many/link")).toMatchObject({ type: "symlink", target: "../elsewhere" })
    expect(entries.some((e) => e.path.includes("sicksync-"))).toBe(false)
    expect(entries.every((e) => !e.path.startsWith("/") && !e.path.includes("\\"))).toBe(true)
    await client.close()
  })

  it("applies operations in order", async () => {
    const { client, root } = await openSession()
    // pipelined without waiting: mkdir, write into it, rename, remove the old parent
    client.send(new Mkdir({ seq: 1, path: "p", mode: 0o755 }))
    client.send(new Write({ seq: 2, path: "p/f", size: 3, mode: 0o644, mtime: Date.now() }))
    client.sendChunk(2, Buffer.from("abc"))
    client.send(new Rename({ seq: 3, from: "p/f", to: "q/f" }))
    client.send(new Remove({ seq: 4, path: "p" }))
    for (const seq of [1, 2, 3, 4]) expect(await client.reply(seq)).toMatchObject({ _tag: "Ack", seq })
    expect(fs.readFileSync(path.join(root, "q/f"), "utf8")).toBe("abc")
    expect(fs.existsSync(path.join(root, "p"))).toBe(false)
    await client.close()
  })
})

describe("pipelined operations, applied concurrently", () => {
  /** Temp files anywhere under `dir`. */
  const tempsUnder = (dir: string): Array<string> =>
    (fs.readdirSync(dir, { recursive: true }) as Array<string>).filter((n) => path.basename(n).includes(".sicksync-"))
  /** `count` unrelated small writes, pipelined. */
  const filler = async (client: DaemonClient, from: number, count: number, dir = "filler") => {
    await Promise.all(Array.from({ length: count }, (_, i) => client.pipelineWrite(from + i, `${dir}/f${i}.txt`, Buffer.from(`filler ${i}`))))
  }
  const expectAcks = (replies: Array<{ _tag: string; seq: number }>, seqs: Array<number>) =>
    expect(replies.map((r) => [r.seq, r._tag])).toEqual(seqs.map((seq) => [seq, "Ack"]))

  it("a write into a directory made by an earlier Mkdir, and a Remove of that directory, keep their order", async () => {
    const { client, root } = await openSession()
    const old = Date.UTC(2001, 0, 1)
    // nothing waits for a reply: Mkdir, writes into it (and into a subdirectory made by a later Mkdir),
    // unrelated writes in between, then a Remove of a written file's directory and a write after it
    client.send(new Mkdir({ seq: 1, path: "p", mode: 0o750, mtime: old }))
    const writes = Array.from({ length: 40 }, (_, i) => client.pipelineWrite(10 + i, `p/f${i}`, Buffer.from(`f${i}`)))
    client.send(new Mkdir({ seq: 2, path: "p/sub", mode: 0o700 }))
    writes.push(client.pipelineWrite(3, "p/sub/g", Buffer.from("g")))
    writes.push(filler(client, 100, 40))
    writes.push(client.pipelineWrite(4, "t/gone", Buffer.from("x")))
    client.send(new Remove({ seq: 5, path: "t" }))
    writes.push(client.pipelineWrite(6, "t/kept", Buffer.from("kept")))
    await Promise.all(writes)
    const seqs = [1, 2, 3, 4, 5, 6, ...Array.from({ length: 40 }, (_, i) => 10 + i), ...Array.from({ length: 40 }, (_, i) => 100 + i)]
    expectAcks(await client.replies(seqs), seqs)
    for (let i = 0; i < 40; i++) expect(fs.readFileSync(path.join(root, `p/f${i}`), "utf8")).toBe(`f${i}`)
    expect(fs.statSync(path.join(root, "p")).mode & 0o777).toBe(0o750)
    // the writes into p came after the Mkdir that set its mtime, so they moved it on
    expect(fs.statSync(path.join(root, "p")).mtimeMs).toBeGreaterThan(old + 1000)
    expect(fs.statSync(path.join(root, "p/sub")).mode & 0o777).toBe(0o700)
    expect(fs.readFileSync(path.join(root, "p/sub/g"), "utf8")).toBe("g")
    expect(fs.readdirSync(path.join(root, "t"))).toEqual(["kept"])
    expect(tempsUnder(root)).toEqual([])
    expect(client.undecodable).toEqual([])
    await client.close()
  })

  it("remove then write, write then write, write then remove: the same path keeps the order", async () => {
    const { client, root } = await openSession()
    fs.mkdirSync(path.join(root, "x/deep/er"), { recursive: true })
    fs.writeFileSync(path.join(root, "x/deep/er/f"), "old")
    client.send(new Remove({ seq: 1, path: "x" }))
    const writes = [client.pipelineWrite(2, "x", Buffer.from("x is a file now"))]
    writes.push(client.pipelineWrite(3, "y", Buffer.from("first")))
    client.send(new Remove({ seq: 4, path: "y" }))
    writes.push(client.pipelineWrite(5, "y", Buffer.from("second")))
    writes.push(filler(client, 100, 30))
    for (let i = 0; i < 10; i++) writes.push(client.pipelineWrite(10 + i, "z", Buffer.from(`z version ${i}`)))
    writes.push(client.pipelineWrite(20, "w/f", Buffer.from("w")))
    client.send(new Remove({ seq: 21, path: "w/f" }))
    // a case-only difference is the same path on a case-insensitive filesystem: ordered all the same
    writes.push(client.pipelineWrite(22, "Case.txt", Buffer.from("upper")))
    client.send(new Remove({ seq: 23, path: "case.txt" }))
    await Promise.all(writes)
    const seqs = [1, 2, 3, 4, 5, ...Array.from({ length: 11 }, (_, i) => 10 + i), 21, 22, 23, ...Array.from({ length: 30 }, (_, i) => 100 + i)]
    expectAcks(await client.replies(seqs), seqs)
    expect(fs.readFileSync(path.join(root, "x"), "utf8")).toBe("x is a file now")
    expect(fs.readFileSync(path.join(root, "y"), "utf8")).toBe("second")
    expect(fs.readFileSync(path.join(root, "z"), "utf8")).toBe("z version 9")
    expect(fs.readdirSync(path.join(root, "w"))).toEqual([])
    expect(fs.readFileSync(path.join(root, "Case.txt"), "utf8")).toBe("upper")
    expect(tempsUnder(root)).toEqual([])
    await client.close()
  })

  it("rename then write into the new directory and the old one", async () => {
    const { client, root } = await openSession()
    client.send(new Mkdir({ seq: 1, path: "a", mode: 0o755 }))
    const writes = [client.pipelineWrite(2, "a/f1", Buffer.from("one"))]
    writes.push(filler(client, 100, 30))
    client.send(new Rename({ seq: 3, from: "a", to: "b" }))
    writes.push(client.pipelineWrite(4, "b/f2", Buffer.from("two")))
    writes.push(client.pipelineWrite(5, "a/f3", Buffer.from("three")))
    client.send(new Rename({ seq: 6, from: "b/f1", to: "c/f1" }))
    writes.push(client.pipelineWrite(7, "c/f1", Buffer.from("one, rewritten")))
    await Promise.all(writes)
    const seqs = [1, 2, 3, 4, 5, 6, 7, ...Array.from({ length: 30 }, (_, i) => 100 + i)]
    expectAcks(await client.replies(seqs), seqs)
    expect(fs.readdirSync(path.join(root, "a"))).toEqual(["f3"])
    expect(fs.readdirSync(path.join(root, "b"))).toEqual(["f2"])
    expect(fs.readFileSync(path.join(root, "b/f2"), "utf8")).toBe("two")
    expect(fs.readFileSync(path.join(root, "a/f3"), "utf8")).toBe("three")
    expect(fs.readFileSync(path.join(root, "c/f1"), "utf8")).toBe("one, rewritten")
    await client.close()
  })

  it("an operation waits for an unfinished write to its path or a descendant; unrelated ones pass it, acked first", async () => {
    const { client, root } = await openSession()
    client.send(new Write({ seq: 1, path: "slow/file", size: 4, mode: 0o644, mtime: Date.now() }))
    client.sendChunk(1, Buffer.from("sl"))
    client.send(new Remove({ seq: 2, path: "slow" })) // an ancestor of the unfinished write: waits for it
    client.send(new Mkdir({ seq: 3, path: "fast", mode: 0o755 }))
    await client.pipelineWrite(4, "other", Buffer.from("other"))
    expect(await client.reply(3)).toMatchObject({ _tag: "Ack" })
    expect(await client.reply(4)).toMatchObject({ _tag: "Ack" })
    await new Promise((r) => setTimeout(r, 100))
    expect(client.received.some((m) => m._tag === "Ack" && (m.seq === 1 || m.seq === 2))).toBe(false)
    expect(fs.existsSync(path.join(root, "slow"))).toBe(true) // made for the write's temp file
    client.sendChunk(1, Buffer.from("ow"))
    expect(await client.reply(1)).toMatchObject({ _tag: "Ack" })
    expect(await client.reply(2)).toMatchObject({ _tag: "Ack" })
    const order = client.received.filter((m) => m._tag === "Ack").map((m) => m.seq)
    expect(order.indexOf(3)).toBeLessThan(order.indexOf(1))
    expect(order.indexOf(1)).toBeLessThan(order.indexOf(2))
    expect(fs.existsSync(path.join(root, "slow"))).toBe(false)
    expect(fs.readFileSync(path.join(root, "other"), "utf8")).toBe("other")
    await client.close()
  })

  it("ListManifest sees every earlier operation and none of the later ones", async () => {
    const { client, root } = await openSession()
    await filler(client, 1, 120, "m")
    client.send(new Remove({ seq: 500, path: "m/f0.txt" })) // before: not listed
    const listed = client.listManifest(501)
    client.send(new Remove({ seq: 502, path: "m/f1.txt" })) // after: still listed
    const { entries, reply } = await listed
    expect(reply).toMatchObject({ _tag: "Ack" })
    const paths = new Set(entries.map((e) => e.path))
    expect(paths.has("m/f0.txt")).toBe(false)
    expect(paths.has("m/f1.txt")).toBe(true)
    expect(entries.filter((e) => e.type === "file").length).toBe(119)
    expect(await client.reply(502)).toMatchObject({ _tag: "Ack" })
    expect(fs.existsSync(path.join(root, "m/f1.txt"))).toBe(false)
    await client.close()
  })

  it("interleaved multi-chunk writes and many small ones: contents intact, window kept, every byte credited", async () => {
    const { client, root } = await openSession()
    const window = 2 * 1024 * 1024
    const big = [crypto.randomBytes(3 * 1024 * 1024 + 5), crypto.randomBytes(2 * 1024 * 1024 + 77)]
    big.forEach((content, i) =>
      client.send(new Write({ seq: 1 + i, path: `big/${i}.bin`, size: content.byteLength, mode: 0o600, mtime: Date.now() }))
    )
    // chunks of the two big files alternate, small writes go in between
    const piece = 256 * 1024
    const smalls: Array<Promise<void>> = []
    for (let offset = 0, n = 0; offset < big[0]!.byteLength; offset += piece, n++) {
      for (let i = 0; i < big.length; i++) {
        if (offset < big[i]!.byteLength) await client.writeChunks(1 + i, big[i]!.subarray(offset, offset + piece), { window })
      }
      smalls.push(client.pipelineWrite(100 + n, `small/${n}`, Buffer.alloc(1000 + n, n), { window }))
    }
    await Promise.all(smalls)
    const seqs = [1, 2, ...smalls.map((_, n) => 100 + n)]
    expectAcks(await client.replies(seqs, 30_000), seqs)
    big.forEach((content, i) => expect(sha(fs.readFileSync(path.join(root, `big/${i}.bin`)))).toBe(sha(content)))
    expect(fs.statSync(path.join(root, "big/0.bin")).mode & 0o777).toBe(0o600)
    smalls.forEach((_, n) => expect(fs.readFileSync(path.join(root, `small/${n}`))).toEqual(Buffer.alloc(1000 + n, n)))
    await eventually(() => client.creditBytes === client.sentChunkBytes, 5_000, "every byte credited")
    expect(client.maxInFlight).toBeLessThanOrEqual(window)
    expect(client.isOpen).toBe(true)
    await client.close()
  })

  it("a session closed with writes in flight leaves no temp file and no partial file", async () => {
    const other = await bystander()
    const { client, root } = await openSession()
    for (let i = 0; i < 20; i++) {
      client.send(new Write({ seq: 500 + i, path: `partial/f${i}`, size: 10_000, mode: 0o644, mtime: Date.now() }))
      client.sendChunk(500 + i, Buffer.alloc(4000, 1))
    }
    client.send(new Remove({ seq: 600, path: "partial" })) // waits for the partial writes, which never complete
    const content = (i: number) => Buffer.alloc(5000 + i, i)
    await Promise.all(Array.from({ length: 150 }, (_, i) => client.pipelineWrite(1 + i, `done/${i % 5}/f${i}`, content(i))))
    // unrelated to the unfinished writes: applied meanwhile
    expectAcks(await client.replies(Array.from({ length: 150 }, (_, i) => 1 + i)), Array.from({ length: 150 }, (_, i) => 1 + i))
    // more in flight, and gone with the connection
    for (let i = 0; i < 100; i++) void client.pipelineWrite(1000 + i, `late/f${i}`, content(i))
    await client.terminate()
    await eventually(() => tempsUnder(root).length === 0, 5_000, "temp files removed")
    await new Promise((r) => setTimeout(r, 200))
    expect(tempsUnder(root)).toEqual([])
    for (let i = 0; i < 150; i++) expect(fs.readFileSync(path.join(root, `done/${i % 5}/f${i}`))).toEqual(content(i))
    // whatever else is there is whole
    for (const name of fs.existsSync(path.join(root, "late")) ? fs.readdirSync(path.join(root, "late")) : []) {
      expect(fs.readFileSync(path.join(root, "late", name))).toEqual(content(Number(name.slice(1))))
    }
    const partial = path.join(root, "partial")
    expect(fs.existsSync(partial) ? fs.readdirSync(partial) : []).toEqual([])
    await other.check()
    await other.client.close()
  })

  it("fast encodings are byte for byte the schema's; the fast Write decoding agrees with the schema", () => {
    expect(encodeAck(2, 7)).toBe(encodeDaemonMessage(new Ack({ ch: 2, seq: 7 })))
    expect(encodeAck(2, 7, 30)).toBe(encodeDaemonMessage(new Ack({ ch: 2, seq: 7, count: 30 })))
    expect(encodeCredit(0, 123456)).toBe(encodeDaemonMessage(new Credit({ ch: 0, bytes: 123456 })))
    const entries = [
      { path: "a", type: "dir" as const, size: 0, mtime: 1700000000123.456, mode: 0o755 },
      { path: "a/\"quoted\" ünïcode", type: "file" as const, size: 5, mtime: 1, mode: 0o4644 },
      { path: "a/l", type: "symlink" as const, size: 3, mtime: 2, mode: 0o777, target: "../x" }
    ]
    for (const done of [false, true]) {
      expect(encodeManifestPage(1, 3, entries, done)).toBe(encodeDaemonMessage(new Manifest({ ch: 1, seq: 3, entries, done })))
    }
    const write = { _tag: "Write", seq: 1, path: "p", size: 2, mode: 0o644, mtime: 1.5 }
    const inputs: Array<unknown> = [
      write,
      { ...write, extra: true },
      { ...write, seq: 0xffffffff },
      { ...write, seq: 0x100000000 },
      { ...write, seq: -1 },
      { ...write, seq: 1.5 },
      { ...write, size: -1 },
      { ...write, size: 2.5 },
      { ...write, mode: 0o10000 },
      { ...write, mode: "644" },
      { ...write, mtime: "now" },
      { ...write, path: 5 },
      { ...write, path: undefined },
      { ...write, ch: 3 },
      { ...write, ch: -1 },
      { ...write, ch: "1" },
      new Mkdir({ seq: 2, path: "d", mode: 0o755 })
    ]
    const mkdir = { _tag: "Mkdir", ch: 2, seq: 2, path: "d", mode: 0o755, mtime: 1700000000123.5 }
    inputs.push(
      mkdir,
      { ...mkdir, mtime: undefined },
      { ...mkdir, ch: undefined },
      { ...mkdir, extra: [1] },
      { ...mkdir, mtime: "now" },
      { ...mkdir, mtime: null },
      { ...mkdir, mode: 0o10000 },
      { ...mkdir, mode: -1 },
      { ...mkdir, mode: 1.5 },
      { ...mkdir, mode: undefined },
      { ...mkdir, path: 3 },
      { ...mkdir, seq: 0x100000000 },
      { ...mkdir, ch: "2" }
    )
    const remove = { _tag: "Remove", ch: 1, seq: 4, path: "r/s" }
    inputs.push(
      remove,
      { ...remove, ch: undefined },
      { ...remove, extra: "x" },
      { ...remove, path: null },
      { ...remove, seq: -1 },
      { ...remove, seq: undefined },
      { ...remove, ch: 1.5 }
    )
    const file = { path: "f", size: 3, mode: 0o600, mtime: 2.5 }
    const batch = { _tag: "WriteBatch", ch: 1, seq: 9, files: [file, { ...file, path: "g" }] }
    inputs.push(
      batch,
      { ...batch, ch: undefined },
      { ...batch, seq: -2 },
      { ...batch, files: [] },
      { ...batch, files: Array.from({ length: MAX_BATCH_FILES }, (_, i) => ({ ...file, path: `f${i}` })) },
      { ...batch, files: Array.from({ length: MAX_BATCH_FILES + 1 }, (_, i) => ({ ...file, path: `f${i}` })) },
      { ...batch, files: "f" },
      { ...batch, files: [file, null] },
      { ...batch, files: [{ ...file, extra: 1 }] },
      { ...batch, files: [{ ...file, size: -3 }] },
      { ...batch, files: [{ ...file, mode: 0o7777 + 1 }] },
      { ...batch, files: [{ ...file, mtime: null }] },
      { ...batch, files: [{ ...file, path: 1 }] }
    )
    for (const input of inputs) {
      const text = JSON.stringify(input)
      const fast = decodeClientMessageFast(text)
      const schema = decodeClientMessage(text)
      expect(fast._tag, text).toBe(schema._tag)
      if (fast._tag === "Right" && schema._tag === "Right") expect(fast.right, text).toStrictEqual(schema.right)
    }
    expect(decodeClientMessageFast("{not json")._tag).toBe("Left")
  })
})

describe("batched writes", () => {
  const tempsUnder = (dir: string): Array<string> =>
    (fs.readdirSync(dir, { recursive: true }) as Array<string>).filter((n) => path.basename(n).includes(".sicksync-"))

  it("writes every file of a WriteBatch with its mode and mtime, answered by one Ack for all", async () => {
    const { client, root } = await openSession()
    const mtime = Date.UTC(2021, 5, 6, 7, 8, 9, 123)
    const files = [
      { path: "a.txt", content: Buffer.from("first") },
      { path: "deep/er/b.sh", content: Buffer.from("#!/bin/sh\n"), mode: 0o755, mtime },
      { path: "empty", content: Buffer.alloc(0) },
      { path: "deep/c.bin", content: crypto.randomBytes(70_000) }
    ]
    client.writeBatch(10, files, { chunkBytes: 30_000 }) // bytes split across frames anywhere
    expect(await client.reply(10)).toMatchObject({ _tag: "Ack", seq: 10, count: 4 })
    for (const f of files) expect(fs.readFileSync(path.join(root, f.path))).toEqual(f.content)
    const st = fs.statSync(path.join(root, "deep/er/b.sh"))
    expect(st.mode & 0o7777).toBe(0o755)
    expect(Math.abs(st.mtimeMs - mtime)).toBeLessThan(1)
    expect(tempsUnder(root)).toEqual([])
    await eventually(() => client.creditBytes === client.sentChunkBytes, 5_000, "every byte credited")
    // nothing else answered it
    expect(client.received.filter((m) => (m._tag === "Ack" || m._tag === "OpFailed") && m.seq >= 10 && m.seq < 14)).toHaveLength(1)
    await client.close()
  })

  it("a file of a batch that cannot be written fails alone, named by its own seq; the others are written", async () => {
    const { client, root } = await openSession()
    const long = "x".repeat(300)
    client.writeBatch(20, [
      { path: "ok/1", content: Buffer.from("one") },
      { path: `ok/${long}`, content: Buffer.from("too long a name") },
      { path: "../escape", content: Buffer.from("outside") },
      { path: "ok/2", content: Buffer.from("two") }
    ])
    const replies = await client.replies([20, 21, 22, 23])
    expect(replies.map((r) => [r.seq, r._tag, r._tag === "OpFailed" ? r.code : ""])).toEqual([
      [20, "Ack", ""],
      [21, "OpFailed", "io"],
      [22, "OpFailed", "confinement"],
      [23, "Ack", ""]
    ])
    expect(replies[1]).toMatchObject({ message: expect.stringContaining(`ok/${long}`) })
    expect(replies.every((r) => r._tag !== "Ack" || r.count === undefined)).toBe(true)
    expect(fs.readdirSync(path.join(root, "ok")).sort()).toEqual(["1", "2"])
    expect(fs.existsSync(path.join(daemon.home, "escape"))).toBe(false)
    expect(tempsUnder(root)).toEqual([])
    await client.close()
  })

  it("a batch naming one file twice, in two cases, or one below another writes them in order: the later one wins", async () => {
    const { client, root } = await openSession()
    // the older one large enough to be written in several steps, the newer one small enough for one:
    // written side by side, the older would land last
    const older = Buffer.alloc(512 * 1024, "o")
    client.writeBatch(30, [
      { path: "same.txt", content: older },
      { path: "Case.txt", content: Buffer.from("upper") },
      { path: "same.txt", content: Buffer.from("newer") },
      { path: "case.txt", content: Buffer.from("lower") }
    ])
    expect(await client.reply(30)).toMatchObject({ _tag: "Ack", count: 4 })
    expect(fs.readFileSync(path.join(root, "same.txt"), "utf8")).toBe("newer")
    // this filesystem tells the two cases apart: both are there
    expect(fs.readFileSync(path.join(root, "Case.txt"), "utf8")).toBe("upper")
    expect(fs.readFileSync(path.join(root, "case.txt"), "utf8")).toBe("lower")
    // one below the other: the file first, then a write below it, which a file there refuses
    client.writeBatch(40, [
      { path: "node", content: older },
      { path: "node/leaf", content: Buffer.from("leaf") }
    ])
    const [first, second] = await client.replies([40, 41])
    expect([first?._tag, second?._tag]).toEqual(["Ack", "OpFailed"])
    expect(fs.readFileSync(path.join(root, "node")).equals(older)).toBe(true)
    await client.close()
  })

  it("keeps its place among the operations: after the Mkdir before it, before the Remove after it", async () => {
    const { client, root } = await openSession()
    client.send(new Mkdir({ seq: 1, path: "made", mode: 0o750 }))
    client.writeBatch(2, [
      { path: "made/a", content: Buffer.from("a") },
      { path: "kept/b", content: Buffer.from("b") }
    ])
    client.send(new Remove({ seq: 4, path: "made" }))
    client.send(new Mkdir({ seq: 5, path: "made/again", mode: 0o755 }))
    client.writeBatch(6, [{ path: "made/again/c", content: Buffer.from("c") }])
    const replies = await client.replies([1, 2, 4, 5, 6])
    expect(replies.map((r) => r._tag)).toEqual(["Ack", "Ack", "Ack", "Ack", "Ack"])
    expect(fs.readdirSync(path.join(root, "made"))).toEqual(["again"])
    expect(fs.readFileSync(path.join(root, "made/again/c"), "utf8")).toBe("c")
    expect(fs.readFileSync(path.join(root, "kept/b"), "utf8")).toBe("b")
    await client.close()
  })

  it("a malformed batch is refused as a whole, with a count of its files; its bytes are dropped; the session goes on", async () => {
    const other = await bystander()
    const { client, root } = await openSession()
    // more bytes than one frame carries: refused before any byte is read
    client.send(new WriteBatch({ seq: 40, files: [
      { path: "big1", size: CHUNK_BYTES, mode: 0o644, mtime: 1 },
      { path: "big2", size: 1, mode: 0o644, mtime: 1 }
    ] }))
    client.sendChunk(40, Buffer.alloc(1000))
    expect(await client.reply(40)).toMatchObject({ _tag: "OpFailed", seq: 40, count: 2, code: "protocol" })
    // more chunk bytes than its files add up to
    client.send(new WriteBatch({ seq: 50, files: [
      { path: "x1", size: 2, mode: 0o644, mtime: 1 },
      { path: "x2", size: 2, mode: 0o644, mtime: 1 }
    ] }))
    client.sendChunk(50, Buffer.from("12345"))
    expect(await client.reply(50)).toMatchObject({ _tag: "OpFailed", seq: 50, count: 2, code: "protocol" })
    // not a batch the schema accepts: refused, for as many files as it lists
    client.sendRaw(JSON.stringify({ _tag: "WriteBatch", seq: 60, files: [{ path: "y" }, { path: "z" }] }))
    expect(await client.reply(60)).toMatchObject({ _tag: "OpFailed", seq: 60, count: 2, code: "protocol" })
    client.sendRaw(JSON.stringify({ _tag: "WriteBatch", seq: 70, files: [] }))
    expect(await client.reply(70)).toMatchObject({ _tag: "OpFailed", seq: 70, code: "protocol" })
    expect(fs.readdirSync(root)).toEqual([])
    client.writeBatch(80, [{ path: "fine", content: Buffer.from("fine") }])
    expect(await client.reply(80)).toMatchObject({ _tag: "Ack", seq: 80, count: 1 })
    await eventually(() => client.creditBytes === client.sentChunkBytes, 5_000, "every byte credited, dropped ones too")
    expect(client.isOpen).toBe(true)
    await other.check()
    await other.client.close()
    await client.close()
  })

  it("a batch whose bytes never come writes nothing when the session ends", async () => {
    const { client, root } = await openSession()
    client.send(new WriteBatch({ seq: 1, files: [
      { path: "never/1", size: 10, mode: 0o644, mtime: 1 },
      { path: "never/2", size: 10, mode: 0o644, mtime: 1 }
    ] }))
    client.sendChunk(1, Buffer.alloc(15, 7)) // one file and a half
    await new Promise((r) => setTimeout(r, 100))
    await client.terminate()
    await new Promise((r) => setTimeout(r, 200))
    expect(fs.existsSync(path.join(root, "never")) ? tempsUnder(path.join(root, "never")) : []).toEqual([])
    expect(fs.existsSync(path.join(root, "never/1"))).toBe(false)
  })
})

describe("atomicity", () => {
  it("Abort deletes the temp file and answers aborted", async () => {
    const { client, root } = await openSession()
    client.send(new Write({ seq: 1, path: "partial.bin", size: 1000, mode: 0o644, mtime: Date.now() }))
    client.sendChunk(1, Buffer.alloc(400, 1))
    await eventually(() => client.creditBytes === 400, 5_000, "credit for the first chunk")
    expect(listTemps(root).length).toBe(1)
    client.send(new Abort({ seq: 1 }))
    expect(await client.reply(1)).toMatchObject({ _tag: "OpFailed", code: "aborted" })
    expect(fs.readdirSync(root)).toEqual([])
    // exactly one reply for seq 1
    await client.op(new Mkdir({ seq: 2, path: "d", mode: 0o755 }))
    expect(client.received.filter((m) => "seq" in m && m.seq === 1 && m._tag !== "Manifest").length).toBe(1)
    await client.close()
  })

  it("a disconnect mid-write deletes the temp file and leaves the old content", async () => {
    const { client, root } = await openSession()
    await client.write(1, "keep.txt", Buffer.from("old"))
    client.send(new Write({ seq: 2, path: "keep.txt", size: 1000, mode: 0o644, mtime: Date.now() }))
    client.sendChunk(2, Buffer.alloc(500, 7))
    await eventually(() => client.creditBytes >= 503, 5_000, "credit")
    expect(listTemps(root).length).toBe(1)
    await client.terminate()
    await eventually(() => listTemps(root).length === 0, 5_000, "temp file removed")
    expect(fs.readFileSync(path.join(root, "keep.txt"), "utf8")).toBe("old")
  })
})

describe("bad input is contained to its session", () => {
  it("garbage text frame: session closed, others unaffected", async () => {
    const other = await bystander()
    const { client } = await openSession()
    client.sendRaw("{ this is not json")
    expect((await client.closed).code).toBe(1002)
    await other.check()
    await other.client.close()
  })

  it("unknown message: OpFailed protocol when it has a seq, closed otherwise", async () => {
    const other = await bystander()
    const { client } = await openSession()
    client.sendRaw(JSON.stringify({ _tag: "Explode", seq: 5 }))
    expect(await client.reply(5)).toMatchObject({ _tag: "OpFailed", code: "protocol" })
    client.sendRaw(JSON.stringify({ _tag: "Write", seq: 6, path: "x" })) // missing fields
    expect(await client.reply(6)).toMatchObject({ _tag: "OpFailed", code: "protocol" })
    expect(await client.op(new Mkdir({ seq: 7, path: "still-works", mode: 0o755 }))).toMatchObject({ _tag: "Ack" })
    client.sendRaw(JSON.stringify({ _tag: "Explode" }))
    expect((await client.closed).code).toBe(1002)
    await other.check()
    await other.client.close()
  })

  it("garbage binary frames: chunk for an unknown seq refused, a runt frame or an unopened channel closes", async () => {
    const other = await bystander()
    const { client, root } = await openSession()
    client.sendRaw(Buffer.from([0, 0, 0, 0, 0, 0, 0, 42, 1, 2, 3]))
    expect(await client.reply(42)).toMatchObject({ _tag: "OpFailed", code: "protocol" })
    // more bytes than announced
    client.send(new Write({ seq: 43, path: "short.txt", size: 2, mode: 0o644, mtime: Date.now() }))
    client.sendChunk(43, Buffer.from("toolong"))
    expect(await client.reply(43)).toMatchObject({ _tag: "OpFailed", code: "protocol" })
    expect(fs.existsSync(path.join(root, "short.txt"))).toBe(false)
    expect(listTemps(root)).toEqual([])
    client.sendRaw(Buffer.from([1, 2]))
    expect((await client.closed).code).toBe(1002)
    const stray = (await openSession()).client
    stray.sendChunk(1, Buffer.from("x"), 9)
    expect((await stray.closed).code).toBe(1002)
    await other.check()
    await other.client.close()
  })

  it("oversized frame: session closed with 1009 and logged, others unaffected", async () => {
    const other = await bystander()
    const { client, root } = await openSession()
    client.send(new Write({ seq: 1, path: "huge.bin", size: MAX_FRAME_BYTES * 2, mode: 0o644, mtime: Date.now() }))
    client.sendRaw(Buffer.alloc(MAX_FRAME_BYTES + 1))
    expect((await client.closed).code).toBe(1009)
    await other.check()
    await eventually(() => listTemps(root).length === 0, 5_000, "temp removed")
    await eventually(() => daemon.logs.some((l) => /code 1009/.test(l)), 5_000, "a log line about 1009")
    await other.client.close()
  })

  it("a client that ignores pings is terminated", async () => {
    const home = tempDir()
    const d = await startDaemon({ home, heartbeatIntervalMs: 50, heartbeatTimeoutMs: 200 })
    const client = await DaemonClient.connect(d.port, { autoPong: false })
    expect((await client.helloAndOpen({ token: d.token, destinationRoot: "~/x" }))._tag).toBe("Opened")
    expect((await client.closed).code).toBe(1006)
    await Effect.runPromise(Fiber.interrupt(d.fiber))
  })
})

describe("confinement", () => {
  it("refuses paths that escape the root, writing nothing outside", async () => {
    const other = await bystander()
    const { client, root } = await openSession()
    const outside = tempDir()
    // something to overwrite, remove or rename through the escaping link
    fs.mkdirSync(path.join(outside, "sub"))
    fs.writeFileSync(path.join(outside, "x"), "outside")
    fs.writeFileSync(path.join(outside, "sub", "x"), "outside")
    fs.symlinkSync(outside, path.join(root, "escape"))
    fs.mkdirSync(path.join(root, "real"))
    fs.symlinkSync("real", path.join(root, "inside"))
    let seq = 0
    fs.writeFileSync(path.join(root, "victim"), "v")
    const escapes = [
      "../x",
      "/etc/x",
      `${outside}/x`,
      "a/../../x",
      "a/../b",
      "..",
      "a\0b",
      "x\0/../../y",
      "escape/x",
      "escape/sub/x",
      "inside/../../x"
    ]
    for (const p of escapes) {
      expectFailed(await client.write(++seq, p, Buffer.from("pwned")), "confinement")
      expectFailed(await client.op(new Mkdir({ seq: ++seq, path: p, mode: 0o777 })), "confinement")
      expectFailed(await client.op(new Symlink({ seq: ++seq, path: p, target: "/" })), "confinement")
      expectFailed(await client.op(new Remove({ seq: ++seq, path: p })), "confinement")
      expectFailed(await client.op(new Rename({ seq: ++seq, from: p, to: "y" })), "confinement")
      expectFailed(await client.op(new Rename({ seq: ++seq, from: "victim", to: p })), "confinement")
      await other.check()
    }
    // the root itself is never written, removed or renamed
    for (const p of ["", ".", "./", "a/.."]) {
      expectFailed(await client.write(++seq, p, Buffer.from("pwned")), "confinement")
      expectFailed(await client.op(new Symlink({ seq: ++seq, path: p, target: "/" })), "confinement")
      expectFailed(await client.op(new Remove({ seq: ++seq, path: p })), "confinement")
      expectFailed(await client.op(new Rename({ seq: ++seq, from: p, to: "y" })), "confinement")
      expectFailed(await client.op(new Rename({ seq: ++seq, from: "victim", to: p })), "confinement")
    }
    expectFailed(await client.op(new Mkdir({ seq: ++seq, path: "", mode: 0o777 })), "confinement")
    await other.check()
    // nothing happened outside, the root is intact
    expect(fs.readdirSync(outside).sort()).toEqual(["sub", "x"])
    expect(fs.readdirSync(path.join(outside, "sub"))).toEqual(["x"])
    expect(fs.readFileSync(path.join(outside, "x"), "utf8")).toBe("outside")
    expect(fs.readFileSync(path.join(outside, "sub", "x"), "utf8")).toBe("outside")
    expect(fs.readlinkSync(path.join(root, "escape"))).toBe(outside)
    expect(fs.existsSync(path.join(root, "..", "x"))).toBe(false)
    expect(fs.statSync(root).isDirectory()).toBe(true)
    expect(fs.readFileSync(path.join(root, "victim"), "utf8")).toBe("v")
    // a symlink that stays inside the root is fine
    expect(await client.write(++seq, "inside/ok.txt", Buffer.from("ok"))).toMatchObject({ _tag: "Ack" })
    expect(fs.readFileSync(path.join(root, "real/ok.txt"), "utf8")).toBe("ok")
    // normalisation of // and ./ stays inside
    expect(await client.write(++seq, "./n//m.txt", Buffer.from("n"))).toMatchObject({ _tag: "Ack" })
    expect(fs.readFileSync(path.join(root, "n/m.txt"), "utf8")).toBe("n")
    // the chunks of a refused write are credited and dropped
    await eventually(() => client.creditBytes === client.sentChunkBytes, 5_000, "credits for dropped chunks")
    expect(daemon.logs.some((l) => l.includes("refused"))).toBe(true)
    await client.close()
    await other.check()
    await other.client.close()
  })
})

describe("lifecycle", () => {
  it("exits after the grace once the last client leaves, removing daemon.json and the lock", async () => {
    const home = tempDir()
    const d = await startDaemon({ home, graceMs: 300 })
    const client = await DaemonClient.connect(d.port)
    expect((await client.helloAndOpen({ token: d.token, destinationRoot: "~/x" }))._tag).toBe("Opened")
    await client.close()
    const exit = await eventually(() => d.fiber.unsafePoll() ?? undefined, 5_000, "daemon exit")
    expect(Exit.isSuccess(exit)).toBe(true)
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.json"))).toBe(false)
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.lock"))).toBe(false)
    expect(d.logs.some((l) => l.includes("shutting down"))).toBe(true)
  })

  it("exits when no client arrives within the grace after start", async () => {
    const home = tempDir()
    const d = await startDaemon({ home, graceMs: 200 })
    const exit = await eventually(() => d.fiber.unsafePoll() ?? undefined, 5_000, "daemon exit")
    expect(Exit.isSuccess(exit)).toBe(true)
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.json"))).toBe(false)
  })

  it("a reconnect within the grace keeps it alive", async () => {
    const home = tempDir()
    const graceMs = 400
    const d = await startDaemon({ home, graceMs })
    const first = await DaemonClient.connect(d.port)
    expect((await first.helloAndOpen({ token: d.token, destinationRoot: "~/x" }))._tag).toBe("Opened")
    await first.close()
    // the daemon has seen the first session end, so the reconnect really lands inside the grace
    await eventually(() => d.logs.some((l) => /closed \(code 1000/.test(l)), 5_000, "the first session's end")
    const second = await DaemonClient.connect(d.port)
    expect((await second.helloAndOpen({ token: d.token, destinationRoot: "~/x" }))._tag).toBe("Opened")
    // well past the grace measured from the first client's departure: still serving
    await new Promise((r) => setTimeout(r, graceMs * 2))
    expect(d.fiber.unsafePoll()).toBeNull()
    expect(await second.op(new Mkdir({ seq: 1, path: "alive", mode: 0o755 }))).toMatchObject({ _tag: "Ack" })
    await second.close()
    await eventually(() => d.fiber.unsafePoll() ?? undefined, 5_000, "daemon exit")
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.json"))).toBe(false)
  })

  it("refuses a second daemon for the same HOME, and takes over a stale lock", async () => {
    const second = await Effect.runPromiseExit(
      runDaemon({ port: 0, graceMs: 1_000, home: daemon.home }).pipe(Effect.provide(DestinationFs.layer({ home: daemon.home })))
    )
    expect(second).toMatchObject({ _tag: "Failure" })
    const error = Exit.isFailure(second) ? Cause.failureOption(second.cause) : undefined
    expect(error).toMatchObject({ value: { _tag: "DaemonAlreadyRunning", pid: process.pid } })
    // the running daemon still owns its files
    expect(readDaemonState(daemon.home)?.pid).toBe(process.pid)

    const home = tempDir()
    const dead = await new Promise<number>((resolve) => {
      const child = spawn(process.execPath, ["-e", ""])
      child.on("exit", () => resolve(child.pid!))
    })
    fs.mkdirSync(path.join(home, ".sicksync"), { mode: 0o700 })
    fs.writeFileSync(path.join(home, ".sicksync", "daemon.lock"), `${dead}\n`)
    fs.utimesSync(path.join(home, ".sicksync", "daemon.lock"), new Date(0), new Date(0))
    const d = await startDaemon({ home })
    expect(fs.readFileSync(path.join(home, ".sicksync", "daemon.lock"), "utf8").trim()).toBe(String(process.pid))
    await Effect.runPromise(Fiber.interrupt(d.fiber))
  })
})

// ---- start-daemon and daemon as child processes ---------------------------------------------------

describe("start-daemon", () => {
  let bundle: string

  beforeAll(async () => {
    const { build } = await import("esbuild")
    const dir = tempDir()
    const src = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "src")
    bundle = path.join(dir, "sicksync-daemon-test.mjs")
    await build({
      // Runs the commands the way src/bin/sicksync.ts does: failures rendered once on stderr, and neither
      // runMain's error report nor its pretty logger, both of which print on stdout.
      stdin: {
        contents: `
          import * as Command from "@effect/cli/Command"
          import * as NodeContext from "@effect/platform-node/NodeContext"
          import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
          import { Cause, Effect } from "effect"
          import { daemonCommand, startDaemonCommand } from "./programs/daemonCommands.ts"
          const root = Command.make("sicksync").pipe(Command.withSubcommands([daemonCommand, startDaemonCommand]))
          Command.run(root, { name: "sicksync", version: "test" })(process.argv).pipe(
            Effect.tapErrorCause((cause) =>
              Effect.sync(() => {
                if (!Cause.isInterruptedOnly(cause)) process.stderr.write("error: " + Cause.pretty(cause) + "\\n")
              })
            ),
            Effect.provide(NodeContext.layer),
            NodeRuntime.runMain({ disableErrorReporting: true, disablePrettyLogger: true })
          )`,
        resolveDir: src,
        loader: "ts"
      },
      outfile: bundle,
      bundle: true,
      platform: "node",
      format: "esm",
      target: "node20",
      logLevel: "error",
      external: ["bufferutil", "utf-8-validate", "cpu-features"],
      banner: { js: "import { createRequire as __r } from 'node:module'; const require = __r(import.meta.url);" }
    })
  })

  const runCli = (home: string, ...args: Array<string>) =>
    new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      execFile(
        process.execPath,
        [bundle, ...args],
        { env: { ...process.env, HOME: home }, timeout: 20_000 },
        (error, stdout, stderr) => resolve({ code: error === null ? 0 : (error.code as number | null), stdout, stderr })
      )
    })
  const run = (home: string, ...args: Array<string>) => runCli(home, "start-daemon", ...args)
  const isGone = (pid: number) => {
    try {
      process.kill(pid, 0)
      return false
    } catch {
      return true
    }
  }

  it("two concurrent start-daemons end with one daemon; both report it; SIGTERM cleans up", async () => {
    const home = tempDir()
    const [a, b] = await Promise.all([run(home, "--port", "0", "--grace-ms", "10000"), run(home, "--port", "0", "--grace-ms", "10000")])
    expect(a.code).toBe(0)
    expect(b.code).toBe(0)
    const lines = [a, b].map((r) => {
      const out = r.stdout.trim().split("\n")
      expect(out.length).toBe(1)
      return JSON.parse(out[0]!) as { port: number; pid: number; version: string; protocolVersion: number; started: boolean }
    })
    expect(lines[0]!.pid).toBe(lines[1]!.pid)
    expect(lines[0]!.port).toBe(lines[1]!.port)
    expect(lines.filter((l) => l.started).length).toBe(1)
    expect(lines[0]).toMatchObject({ version: VERSION, protocolVersion: PROTOCOL_VERSION })
    const state = readDaemonState(home)!
    expect(state.pid).toBe(lines[0]!.pid)
    // without V8's memory reducer (see DAEMON_NODE_FLAGS)
    if (process.platform === "linux") {
      const argv = fs.readFileSync(`/proc/${state.pid}/cmdline`, "utf8").split("\0")
      expect(argv.slice(1, argv.indexOf("daemon"))).toContain("--no-memory-reducer")
    }
    expect(fs.existsSync(path.join(home, ".sicksync", "logs", "daemon.log"))).toBe(true)

    // a third one finds it running
    const c = await run(home, "--port", "0")
    expect(JSON.parse(c.stdout)).toMatchObject({ pid: state.pid, port: state.port, started: false })

    // it serves
    const client = await DaemonClient.connect(state.port)
    expect((await client.helloAndOpen({ token: state.token, destinationRoot: "~/p" }))._tag).toBe("Opened")
    expect(await client.write(1, "f.txt", Buffer.from("hi"))).toMatchObject({ _tag: "Ack" })
    await client.close()

    process.kill(state.pid, "SIGTERM")
    await eventually(() => isGone(state.pid), 5_000, "daemon exit")
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.json"))).toBe(false)
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.lock"))).toBe(false)
    expect(fs.readFileSync(path.join(home, ".sicksync", "logs", "daemon.log"), "utf8")).not.toContain(state.token)
  })

  it("reports a daemon that cannot start, with the log tail", async () => {
    const home = tempDir()
    // daemon.json is a directory: the daemon cannot publish its state and gives up
    fs.mkdirSync(path.join(home, ".sicksync", "daemon.json"), { recursive: true })
    const r = await run(home, "--port", "0")
    expect(r.code).not.toBe(0)
    expect(r.stdout).toBe("")
    // said once, on stderr
    expect(r.stderr.split("could not start").length).toBe(2)
    expect(r.stderr).toContain("last lines of")
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.lock"))).toBe(false)
  })

  it("the daemon it starts exits after --grace-ms once its last client leaves", async () => {
    const home = tempDir()
    const r = await run(home, "--port", "0", "--grace-ms", "300")
    expect(r.code).toBe(0)
    const line = JSON.parse(r.stdout) as { pid: number; started: boolean }
    expect(line.started).toBe(true)
    const state = readDaemonState(home)!
    const client = await DaemonClient.connect(state.port)
    expect((await client.helloAndOpen({ token: state.token, destinationRoot: "~/p" }))._tag).toBe("Opened")
    expect(await client.op(new Mkdir({ seq: 1, path: "d", mode: 0o755 }))).toMatchObject({ _tag: "Ack" })
    await client.close()
    await eventually(() => isGone(line.pid), 5_000, "daemon exit after the grace")
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.json"))).toBe(false)
    expect(fs.existsSync(path.join(home, ".sicksync", "daemon.lock"))).toBe(false)
  })

  it("`sicksync daemon` refuses to run beside a running daemon, which keeps serving", async () => {
    const other = await bystander()
    const r = await runCli(daemon.home, "daemon", "--port", "0", "--grace-ms", "1000")
    expect(r.code).not.toBe(0)
    expect(r.stdout).toBe("")
    expect(r.stderr).toContain(`already running (pid ${process.pid})`)
    expect(readDaemonState(daemon.home)).toMatchObject({ pid: process.pid, port: daemon.port, token: daemon.token })
    expect(fs.readFileSync(path.join(daemon.home, ".sicksync", "daemon.lock"), "utf8").trim()).toBe(String(process.pid))
    await other.check()
    await other.client.close()
  })
})

import { describe, expect, it } from "@effect/vitest"
import { Deferred, Duration, Effect, Exit, Fiber, Layer, Logger, Option, Random, Schedule, Scope, TestClock } from "effect"
import { execFileSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import {
  defaultSyncOptions,
  fileSource,
  makeDestinationWorker as makeWorker,
  makeScanner,
  FAILURES_SHOWN,
  MAX_UNSETTLED,
  reconnectSchedule,
  seenFile,
  type SyncOptions,
  type WorkerMode
} from "../src/programs/syncProject.js"
import type { ResolvedDestination, ResolvedProject } from "../src/schemas/ConfigFile.js"
import type { ManifestEntry } from "../src/schemas/Protocol.js"
import { ConnectError } from "../src/services/DaemonLocator.js"
import { type Excludes, fromPatterns, none } from "../src/services/Excludes.js"
import * as Progress from "../src/services/Progress.js"
import * as Status from "../src/services/Status.js"
import { fakeRemote } from "./support/fakeRemote.js"
import { tempDirs, testDestination, testProject } from "./support/fixtures.js"
import { ConnectionLost, makeMemory, RemoteConnection } from "../src/services/RemoteConnection.js"

const fast: SyncOptions = { ...defaultSyncOptions, settle: "5 millis", backoffBase: "5 millis", backoffCap: "20 millis" }

const dest = testDestination

const project = (root: string, ...names: Array<string>): ResolvedProject => testProject(root, { destinations: names })


const tmpRoot = tempDirs("sicksync-sync-")

const eventually = <A>(check: () => A | undefined, what: string) =>
  Effect.gen(function* () {
    const deadline = Date.now() + 5000
    for (;;) {
      const value = check()
      if (value !== undefined && value !== false) return value
      if (Date.now() > deadline) return yield* Effect.dieMessage(`timed out waiting for ${what}`)
      yield* Effect.sleep("5 millis")
    }
  })

const makeDestinationWorker = (
  p: ResolvedProject,
  d: ResolvedDestination,
  excludes: Excludes,
  options: SyncOptions,
  mode: WorkerMode = "live"
) => Effect.flatMap(makeScanner(p, excludes), (scanner) => makeWorker(p, d, excludes, scanner, options, mode))

describe("destination worker", () => {
  it.live("sends new files, directories and removals, parents first", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.mkdirSync(path.join(root, "a/b"), { recursive: true })
      fs.writeFileSync(path.join(root, "a/b/f.txt"), "hello")
      const remote = yield* fakeRemote
      const scope = yield* Scope.make()
      const worker = yield* makeDestinationWorker(project(root, "one"), dest("one"), fromPatterns([]), fast).pipe(
        Effect.provide(remote.layer)
      )
      yield* Effect.forkIn(worker.run, scope)
      yield* worker.offer([
        { path: "a/b/f.txt", kind: "upsert" },
        { path: "gone", kind: "remove" },
        { path: "a", kind: "upsert" },
        { path: "a/b", kind: "upsert" }
      ])
      const applied = yield* eventually(() => (remote.applied.get("one")?.length === 4 ? remote.applied.get("one") : undefined), "4 ops")
      expect(applied).toEqual(["Remove gone", "Mkdir a", "Mkdir a/b", "Write a/b/f.txt hello"])
      yield* Scope.close(scope, Exit.void)
    })
  )

  it.live("a change for a path that no longer exists becomes a removal; excluded paths are skipped", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.writeFileSync(path.join(root, "x.log"), "log")
      const remote = yield* fakeRemote
      const scope = yield* Scope.make()
      const worker = yield* makeDestinationWorker(project(root, "one"), dest("one"), fromPatterns(["*.log"]), fast).pipe(
        Effect.provide(remote.layer)
      )
      yield* Effect.forkIn(worker.run, scope)
      yield* worker.offer([{ path: "x.log", kind: "upsert" }, { path: "vanished.txt", kind: "upsert" }])
      const applied = yield* eventually(() => remote.applied.get("one"), "an op")
      expect(applied).toEqual(["Remove vanished.txt"])
      yield* Scope.close(scope, Exit.void)
    })
  )

  it.live("an offline destination queues changes (latest wins) and catches up when back", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      const remote = yield* fakeRemote
      remote.offline.add("one")
      const scope = yield* Scope.make()
      const worker = yield* makeDestinationWorker(project(root, "one"), dest("one"), fromPatterns([]), fast).pipe(
        Effect.provide(remote.layer)
      )
      yield* Effect.forkIn(worker.run, scope)
      fs.writeFileSync(path.join(root, "f"), "v1")
      yield* worker.offer([{ path: "f", kind: "upsert" }])
      yield* eventually(() => (remote.opens.get("one") ?? 0) >= 3, "a few connection attempts")
      fs.writeFileSync(path.join(root, "f"), "v2")
      yield* worker.offer([{ path: "f", kind: "upsert" }, { path: "g", kind: "upsert" }])
      yield* worker.offer([{ path: "g", kind: "remove" }])
      remote.offline.delete("one")
      const applied = yield* eventually(() => (remote.applied.get("one")?.length === 2 ? remote.applied.get("one") : undefined), "catch-up")
      expect([...applied].sort()).toEqual(["Remove g", "Write f v2"])
      yield* Scope.close(scope, Exit.void)
    })
  )

  it.live("changes not acknowledged when the connection dies are sent again after reconnecting", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.writeFileSync(path.join(root, "f"), "data")
      const remote = yield* fakeRemote
      const gate = yield* Deferred.make<void>()
      remote.held.set("one", gate)
      const scope = yield* Scope.make()
      const worker = yield* makeDestinationWorker(project(root, "one"), dest("one"), fromPatterns([]), fast).pipe(
        Effect.provide(remote.layer)
      )
      yield* Effect.forkIn(worker.run, scope)
      yield* worker.offer([{ path: "f", kind: "upsert" }])
      yield* eventually(() => remote.applied.get("one")?.length === 1, "first attempt")
      // The session dies before the ack: the write must be retried on the next session.
      remote.held.delete("one")
      yield* Deferred.succeed(remote.sessions.get("one")!, new ConnectionLost({ dest: "one", message: "cut" }))
      yield* Deferred.succeed(gate, undefined)
      const applied = yield* eventually(() => (remote.applied.get("one")?.length === 2 ? remote.applied.get("one") : undefined), "retry")
      expect(applied).toEqual(["Write f data", "Write f data"])
      expect(remote.opens.get("one")).toBe(2)
      yield* Scope.close(scope, Exit.void)
    })
  )

  it.live("a reconnect does not reuse a scan older than the changes sent before the connection died", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      for (let i = 0; i < 5; i++) fs.writeFileSync(path.join(root, `old${i}`), "x")
      const remote = yield* fakeRemote
      const p = project(root, "one")
      const scanner = yield* makeScanner(p, none)
      yield* scanner.scan(0) // the scan the first reconciliation reuses (as the project's prefetch)
      const scope = yield* Scope.make()
      const worker = yield* makeWorker(p, dest("one"), none, scanner, fast, "live").pipe(Effect.provide(remote.layer))
      const running = yield* Effect.forkIn(worker.run, scope)
      yield* eventually(() => remote.opens.get("one") === 1, "connected")
      yield* Effect.sleep("50 millis") // its reconciliation: nothing to do
      // 30 files made and sent live, within the time a scan may be reused
      for (let i = 0; i < 30; i++) fs.writeFileSync(path.join(root, `new${i}`), "y")
      yield* worker.offer(Array.from({ length: 30 }, (_, i) => ({ path: `new${i}`, kind: "upsert" as const })))
      yield* eventually(() => (remote.applied.get("one") ?? []).length === 30, "sent live")
      yield* Deferred.succeed(remote.sessions.get("one")!, new ConnectionLost({ dest: "one", message: "cut" }))
      yield* eventually(() => remote.opens.get("one") === 2, "reconnected")
      // The first scan knows none of the 30 files the destination now lists: reused, its plan would
      // delete them (and, as that is most of the destination, halt it).
      yield* Effect.sleep("100 millis")
      expect(Option.isNone(yield* Fiber.poll(running))).toBe(true) // still running, not halted
      expect(remote.applied.get("one")!.filter((op) => op.startsWith("Remove"))).toEqual([])
      yield* Scope.close(scope, Exit.void)
    })
  )

  it.live("a held destination does not delay another", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.writeFileSync(path.join(root, "f"), "x")
      const remote = yield* fakeRemote
      const gate = yield* Deferred.make<void>()
      remote.held.set("slow", gate)
      const p = project(root, "slow", "fast")
      const scope = yield* Scope.make()
      const workers = yield* Effect.forEach(p.destinations, (d) => makeDestinationWorker(p, d, fromPatterns([]), fast)).pipe(
        Effect.provide(remote.layer)
      )
      for (const w of workers) yield* Effect.forkIn(w.run, scope)
      for (let i = 0; i < 5; i++) {
        fs.writeFileSync(path.join(root, `f${i}`), `${i}`)
        for (const w of workers) yield* w.offer([{ path: `f${i}`, kind: "upsert" }])
        yield* eventually(() => remote.applied.get("fast")?.includes(`Write f${i} ${i}`), `fast gets f${i}`)
      }
      expect(remote.applied.get("slow")).toEqual(["Write f0 0"])
      yield* Deferred.succeed(gate, undefined)
      yield* eventually(() => remote.applied.get("slow")?.length === 5, "slow catches up")
      yield* Scope.close(scope, Exit.void)
    })
  )

  it.live("a destination that refuses for good is halted without retrying", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      let attempts = 0
      const refusing = Layer.succeed(
        RemoteConnection,
        RemoteConnection.of({
          open: (d) =>
            Effect.suspend(() => {
              attempts++
              return Effect.fail(new ConnectError({ dest: d.name, message: "protocol mismatch", retryable: false }))
            })
        })
      )
      const worker = yield* makeDestinationWorker(project(root, "one"), dest("one"), fromPatterns([]), fast).pipe(
        Effect.provide(Layer.mergeAll(refusing, Progress.layerNone, Status.layerNone))
      )
      const outcome = yield* Effect.flip(worker.run)
      expect(outcome).toMatchObject({ _tag: "DestinationHalted", dest: "one", message: "protocol mismatch" })
      expect(attempts).toBe(1)
    })
  )
})

describe("reconciliation in the worker", () => {
  const entry = (p: string, type: ManifestEntry["type"], extra: Partial<ManifestEntry> = {}): ManifestEntry => ({
    path: p,
    type,
    size: 0,
    mtime: 0,
    mode: type === "dir" ? 0o755 : 0o644,
    ...extra
  })

  it.live("on connect: sends what differs, deletes what is gone, leaves excluded remote paths alone", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.mkdirSync(path.join(root, "src"))
      fs.writeFileSync(path.join(root, "src/same.ts"), "same")
      fs.writeFileSync(path.join(root, "src/new.ts"), "new")
      const same = fs.statSync(path.join(root, "src/same.ts"))
      const remote = yield* fakeRemote
      remote.manifests.set("one", [
        entry("src", "dir", { mode: fs.statSync(path.join(root, "src")).mode & 0o7777 }),
        entry("src/same.ts", "file", { size: same.size, mtime: same.mtimeMs, mode: same.mode & 0o7777 }),
        entry("stale", "dir"),
        entry("stale/a", "file"),
        entry("old.txt", "file"),
        entry("node_modules", "dir"),
        entry("node_modules/x.js", "file")
      ])
      const scope = yield* Scope.make()
      const worker = yield* makeDestinationWorker(project(root, "one"), dest("one"), fromPatterns(["node_modules/"]), fast).pipe(
        Effect.provide(remote.layer)
      )
      yield* Effect.forkIn(worker.run, scope)
      const applied = yield* eventually(() => (remote.applied.get("one")?.length === 3 ? remote.applied.get("one") : undefined), "3 ops")
      expect([...applied].sort()).toEqual(["Remove old.txt", "Remove stale", "Write src/new.ts new"])
      yield* Scope.close(scope, Exit.void)
    })
  )

  it.live("a file planned from the scan is sent as it is when sent, whatever it became since", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      const at = (name: string) => path.join(root, name)
      for (const name of ["same", "grown", "chmod", "to-dir", "to-link", "to-fifo", "gone", "target"]) {
        fs.writeFileSync(at(name), name === "target" ? "xyz" : "abc")
        fs.chmodSync(at(name), 0o644) // whatever the umask
      }
      // the link's target looks exactly like the file it replaces: only its type tells them apart
      for (const name of ["to-link", "target"]) fs.utimesSync(at(name), 1_700_000_000, 1_700_000_000)
      const remote = yield* fakeRemote
      remote.manifests.set("one", [])
      const p = project(root, "one")
      const scanner = yield* makeScanner(p, none)
      // the scan that the reconciliation reuses, taken before the changes
      yield* scanner.scan(0)
      fs.appendFileSync(at("grown"), "+")
      fs.chmodSync(at("chmod"), 0o600)
      fs.rmSync(at("to-dir"))
      fs.mkdirSync(at("to-dir"))
      fs.rmSync(at("to-link"))
      fs.symlinkSync("target", at("to-link"))
      fs.rmSync(at("to-fifo"))
      execFileSync("mkfifo", [at("to-fifo")]) // opening it to read would wait for a writer
      fs.rmSync(at("gone"))
      yield* makeWorker(p, dest("one"), none, scanner, fast, "once").pipe(Effect.flatMap((w) => w.run), Effect.provide(remote.layer))
      expect([...remote.applied.get("one")!].sort()).toEqual([
        "Mkdir to-dir",
        "Remove gone",
        "Symlink to-link",
        "Write chmod abc",
        "Write grown abc+",
        "Write same abc",
        "Write target xyz"
      ])
      expect(remote.modes.get("one chmod")).toBe(0o600)
    })
  )

  it.live("--no-delete keeps remote extras; dry-run sends nothing", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.writeFileSync(path.join(root, "a"), "a")
      const remote = yield* fakeRemote
      remote.manifests.set("one", [entry("extra", "file")])
      yield* makeDestinationWorker(project(root, "one"), dest("one"), none, { ...fast, noDelete: true }, "once").pipe(
        Effect.flatMap((w) => w.run),
        Effect.provide(remote.layer)
      )
      expect(remote.applied.get("one")).toEqual(["Write a a"])
      remote.manifests.set("two", [entry("extra", "file")])
      yield* makeDestinationWorker(project(root, "two"), dest("two"), none, fast, "dry-run").pipe(
        Effect.flatMap((w) => w.run),
        Effect.provide(remote.layer)
      )
      expect(remote.applied.get("two")).toBeUndefined()
    })
  )

  it.live("a change the daemon refuses as too busy is sent again; one that fails for good fails a once run", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.writeFileSync(path.join(root, "busy.txt"), "busy")
      fs.writeFileSync(path.join(root, "broken.txt"), "broken")
      fs.writeFileSync(path.join(root, "fine.txt"), "fine")
      const remote = yield* fakeRemote
      remote.manifests.set("one", [])
      remote.refuse.set("one busy.txt", ["protocol", "protocol"])
      remote.refuse.set("one broken.txt", ["io"])
      const error = yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast, "once").pipe(
        Effect.flatMap((w) => Effect.flip(w.run)),
        Effect.provide(remote.layer)
      )
      expect(error.message).toMatch(/1 change\(s\) could not be applied/)
      const applied = remote.applied.get("one") ?? []
      expect(applied.filter((op) => op === "Write busy.txt busy")).toHaveLength(3) // refused twice, then acked
      expect(applied.filter((op) => op === "Write broken.txt broken")).toHaveLength(1) // an io error is not retried
      expect(applied).toContain("Write fine.txt fine")
    })
  )

  it.live("an empty source facing a full destination halts instead of deleting", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      const remote = yield* fakeRemote
      remote.manifests.set("one", [entry("precious", "file"), entry("more", "dir")])
      const error = yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast, "once").pipe(
        Effect.flatMap((w) => Effect.flip(w.run)),
        Effect.provide(remote.layer)
      )
      expect(error.message).toMatch(/source is empty while the destination holds 2 entries/)
      expect(remote.applied.get("one")).toBeUndefined()
    })
  )

  it.live("deleting most of a large destination is refused unless forced", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.writeFileSync(path.join(root, "keep"), "k")
      const remote = yield* fakeRemote
      const many = Array.from({ length: 30 }, (_, i) => entry(`f${i}`, "file"))
      remote.manifests.set("one", many)
      remote.manifests.set("two", many)
      const error = yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast, "once").pipe(
        Effect.flatMap((w) => Effect.flip(w.run)),
        Effect.provide(remote.layer)
      )
      expect(error.message).toMatch(/would delete 30 of the 30 entries/)
      expect(remote.applied.get("one")).toBeUndefined()
      const forced = { ...fast, safety: { ...fast.safety, force: true } }
      yield* makeDestinationWorker(project(root, "two"), dest("two"), none, forced, "once").pipe(
        Effect.flatMap((w) => w.run),
        Effect.provide(remote.layer)
      )
      expect(remote.applied.get("two")?.filter((op) => op.startsWith("Remove")).length).toBe(30)
    })
  )

  it.live("answers are taken as they come while sending goes on: the progress bar moves before the last file is sent", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      for (let i = 0; i < 40; i++) fs.writeFileSync(path.join(root, `f${i}`), `file ${i}`)
      // Each operation is answered as it is applied: a worker taking its answers only after sending
      // everything advances the bar first when the destination already holds all 40 files.
      const memory = makeMemory()
      const heldAtAdvance: Array<number> = []
      const progress = Layer.succeed(
        Progress.Progress,
        Progress.Progress.of({
          start: () => Effect.succeed({ advance: () => Effect.sync(() => void heldAtAdvance.push(memory.trees.get("one")?.size ?? 0)), drawn: false })
        })
      )
      yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast, "once").pipe(
        Effect.flatMap((w) => w.run),
        Effect.provide(Layer.mergeAll(memory.layer, progress, Status.layerNone))
      )
      expect(memory.trees.get("one")?.size).toBe(40)
      expect(heldAtAdvance).toHaveLength(40)
      expect(heldAtAdvance[0]).toBeLessThan(40)
      // in order, each after its own operation
      expect(heldAtAdvance.every((held, i) => held >= i + 1)).toBe(true)
    })
  )

  it.live("names each change up to 25, else the first 20 and how many more", () =>
    Effect.gen(function* () {
      const linesFor = (files: number) =>
        Effect.gen(function* () {
          const root = tmpRoot()
          for (let i = 0; i < files; i++) fs.writeFileSync(path.join(root, `f${String(i).padStart(2, "0")}`), "x")
          const lines: Array<string> = []
          const logger = Logger.make(({ message }) => {
            const text = Array.isArray(message) ? message.join(" ") : String(message)
            if (text.startsWith(">")) lines.push(text)
          })
          yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast, "once").pipe(
            Effect.flatMap((w) => w.run),
            Effect.provide(Layer.mergeAll(makeMemory().layer, Progress.layerNone, Status.layerNone)),
            Effect.provide(Logger.replace(Logger.defaultLogger, logger))
          )
          return lines
        })
      const names = (n: number) => Array.from({ length: n }, (_, i) => `> change f${String(i).padStart(2, "0")}`)
      expect(yield* linesFor(25)).toEqual(names(25))
      expect(yield* linesFor(26)).toEqual([...names(20), "> … and 6 more"])
    })
  )

  it.live(`names the first ${FAILURES_SHOWN} failures, counts the rest by cause, and does not call the result in sync`, () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      const name = (i: number) => `f${String(i).padStart(2, "0")}`
      for (let i = 0; i <= FAILURES_SHOWN + 3; i++) fs.writeFileSync(path.join(root, name(i)), "x")
      const remote = yield* fakeRemote
      remote.manifests.set("one", [])
      const full = (i: number) => ({ code: "io" as const, message: `write /d/.${name(i)}.tmp: ENOSPC: no space left on device, write` })
      // f00 is written; f01 to f12 meet a full disk, f13 a permission error
      for (let i = 1; i <= FAILURES_SHOWN + 2; i++) remote.refuse.set(`one ${name(i)}`, [full(i)])
      remote.refuse.set(`one ${name(FAILURES_SHOWN + 3)}`, [{ code: "io", message: `open /d/.x.tmp: EACCES: permission denied, open` }])
      const lines: Array<string> = []
      const logger = Logger.make(({ logLevel, message }) => {
        lines.push(`${logLevel.label} ${Array.isArray(message) ? message.join(" ") : String(message)}`)
      })
      const error = yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast, "once").pipe(
        Effect.flatMap((w) => Effect.flip(w.run)),
        Effect.provide(remote.layer),
        Effect.provide(Logger.replace(Logger.defaultLogger, logger))
      )
      expect(error.message).toMatch(new RegExp(`^${FAILURES_SHOWN + 3} change\\(s\\) could not be applied`))
      const named = lines.filter((l) => / failed: /.test(l) && !l.includes("more failed"))
      expect(named).toEqual(Array.from({ length: FAILURES_SHOWN }, (_, i) => `ERROR change ${name(i + 1)} failed: ${full(i + 1).message}`))
      expect(lines).toContain("ERROR … and 3 more failed: ENOSPC (no space left on device) ×2, EACCES (permission denied) ×1")
      expect(lines).toContain(`INFO > change ${name(0)}`)
      expect(lines.some((l) => l.includes("in sync"))).toBe(false)
      expect(lines.find((l) => l.includes("out of sync:"))).toMatch(
        new RegExp(`^ERROR out of sync: ${FAILURES_SHOWN + 3} change\\(s\\) failed \\(see above\\); sent 1 \\(1 B\\), deleted 0, in `)
      )
    })
  )

  it.live(`sending waits for the oldest answer while ${MAX_UNSETTLED} operations are unanswered`, () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      const files = MAX_UNSETTLED + 50
      for (let i = 0; i < files; i++) fs.writeFileSync(path.join(root, `f${i}`), "")
      const remote = yield* fakeRemote
      remote.manifests.set("one", [])
      const gate = yield* Deferred.make<void>()
      remote.held.set("one", gate)
      const run = yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast, "once").pipe(
        Effect.flatMap((w) => w.run),
        Effect.provide(remote.layer),
        Effect.fork
      )
      // the oldest is waited for once one more than the limit is out
      yield* eventually(() => remote.applied.get("one")?.length === MAX_UNSETTLED + 1, "the limit")
      yield* Effect.sleep("50 millis")
      expect(remote.applied.get("one")).toHaveLength(MAX_UNSETTLED + 1)
      yield* Deferred.succeed(gate, undefined)
      yield* Fiber.join(run)
      expect(remote.applied.get("one")).toHaveLength(files)
    })
  )

  it.live("a stale remove for a path that exists again sends it instead", () =>
    Effect.gen(function* () {
      const root = tmpRoot()
      fs.writeFileSync(path.join(root, "back"), "again")
      const remote = yield* fakeRemote
      const scope = yield* Scope.make()
      const worker = yield* makeDestinationWorker(project(root, "one"), dest("one"), none, fast).pipe(Effect.provide(remote.layer))
      yield* Effect.forkIn(worker.run, scope)
      yield* worker.offer([{ path: "back", kind: "remove" }])
      const applied = yield* eventually(() => remote.applied.get("one"), "an op")
      expect(applied).toEqual(["Write back again"])
      yield* Scope.close(scope, Exit.void)
    })
  )
})

describe("fileSource", () => {
  const readAll = (abs: string, stats: fs.Stats) =>
    Effect.gen(function* () {
      const parts: Array<Uint8Array> = []
      yield* fileSource(abs, "f", seenFile(stats), false).read((chunk) => Effect.sync(() => void parts.push(chunk)))
      return Buffer.concat(parts)
    })

  for (const size of [10, 3 * 1024 * 1024]) {
    it.effect(`reads a ${size}-byte file whole, and notices one that changed since it was seen`, () =>
      Effect.gen(function* () {
        const abs = path.join(tmpRoot(), "f")
        fs.writeFileSync(abs, Buffer.alloc(size, 1))
        const stats = fs.statSync(abs)
        expect((yield* readAll(abs, stats)).byteLength).toBe(size)
        fs.appendFileSync(abs, "more") // still being written
        const error = yield* Effect.flip(readAll(abs, stats))
        expect(error._tag).toBe("SourceChanged")
        fs.rmSync(abs)
        expect((yield* Effect.flip(readAll(abs, stats)))._tag).toBe("SourceChanged")
      })
    )
  }
})

describe("reconnect backoff", () => {
  it.effect("grows exponentially from the base and is capped, with jitter pinned to 1.0", () =>
    Effect.gen(function* () {
      const delays: Array<number> = []
      const fiber = yield* Effect.fail("down").pipe(
        Effect.retry(
          reconnectSchedule({ ...defaultSyncOptions, backoffBase: "100 millis", backoffCap: "1 second" }).pipe(
            Schedule.tapOutput((d) => Effect.sync(() => delays.push(Math.round(Duration.toMillis(d))))),
            Schedule.intersect(Schedule.recurs(6))
          )
        ),
        Effect.fork
      )
      for (let i = 0; i < 7; i++) yield* TestClock.adjust("1 second")
      yield* Fiber.await(fiber)
      expect(delays.slice(0, 6)).toEqual([100, 200, 400, 800, 1000, 1000])
    }).pipe(Effect.withRandom(Random.fixed([0.5])))
  )
})


import { describe, expect, it } from "@effect/vitest"
import { Cause, Effect, Exit, Fiber, Option, Queue, Scope, Stream } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { fold } from "../src/programs/coalesce.js"
import type { FileEvent } from "../src/schemas/FileEvent.js"
import { fromPatterns, none } from "../src/services/Excludes.js"
import { Watcher, WatchError, layer as WatcherLive, layerTest, start, watch } from "../src/services/Watcher.js"

// ---- helpers ------------------------------------------------------------------------------------

const tmpDir = Effect.acquireRelease(
  Effect.sync(() => fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-watch-")))),
  (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
)

const write = (root: string, rel: string, content = "x") => {
  fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true })
  fs.writeFileSync(path.join(root, rel), content)
}

/** Polls `check` (which throws while unmet, e.g. a failing `expect`) until it holds or the deadline passes. */
const eventually = (check: () => void, timeoutMs = 4000) =>
  Effect.gen(function*() {
    const deadline = Date.now() + timeoutMs
    while (true) {
      try {
        check()
        return
      } catch (error) {
        if (Date.now() > deadline) return yield* Effect.die(error)
      }
      yield* Effect.sleep("10 millis")
    }
  })

/** Starts a watch in the current scope and records its events (and how it ended) as they come. */
const record = (options: { root: string; excludes?: ReturnType<typeof fromPatterns>; followSymLinks?: boolean }) =>
  Effect.gen(function*() {
    const handle = yield* start({
      root: options.root,
      excludes: options.excludes ?? none,
      followSymLinks: options.followSymLinks ?? false
    })
    const seen: Array<FileEvent> = []
    let end: Option.Option<Exit.Exit<void, WatchError>> = Option.none()
    yield* handle.events.pipe(
      Stream.runForEach((e) => Effect.sync(() => seen.push(e))),
      Effect.exit,
      Effect.tap((exit) => Effect.sync(() => (end = Option.some(exit)))),
      Effect.forkScoped
    )
    const has = (kind: FileEvent["kind"], p: string) => seen.some((e) => e.kind === kind && e.path === p)
    return { handle, seen, has, end: () => end }
  })

/** Open `fs.watch` handles of this process (vitest runs each test file in its own worker). */
const fsWatchHandles = () => process.getActiveResourcesInfo().filter((r) => r === "FSEventWrap").length
/** Handles of earlier tests close asynchronously: wait until none is left (fails if one leaked). */
const noWatchHandles = eventually(() => expect(fsWatchHandles()).toBe(0))

// ---- tests ----------------------------------------------------------------------------------------

describe("Watcher (chokidar)", () => {
  it.scopedLive("reports creating, modifying and deleting a file, with root-relative paths", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      write(root, "src/keep.ts")
      const w = yield* record({ root })
      expect(w.seen).toEqual([]) // ignoreInitial: existing files are not reported

      write(root, "src/a.ts", "1")
      yield* eventually(() => expect(w.has("add", "src/a.ts")).toBe(true))
      write(root, "src/a.ts", "22")
      yield* eventually(() => expect(w.has("change", "src/a.ts")).toBe(true))
      fs.rmSync(path.join(root, "src/a.ts"))
      yield* eventually(() => expect(w.has("unlink", "src/a.ts")).toBe(true))
      for (const e of w.seen) expect(e.path).not.toMatch(/^\/|\\/)
      expect(fold(w.seen)).toEqual([])
    }))

  it.scopedLive("a write right after a reported one is not lost (chokidar throttles changes for 50 ms)", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      write(root, "f.txt", "0")
      const w = yield* record({ root })
      write(root, "f.txt", "1")
      yield* eventually(() => expect(w.has("change", "f.txt")).toBe(true), 4000)
      write(root, "f.txt", "222") // within chokidar's throttle window of the first change
      yield* eventually(() => expect(w.seen.filter((e) => e.path === "f.txt").length).toBeGreaterThanOrEqual(2))
    }))

  it.scopedLive("mkdir -p with nested files written right away: every level is reported", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      const w = yield* record({ root })
      fs.mkdirSync(path.join(root, "n/m/o"), { recursive: true })
      write(root, "n/m/o/deep.txt")
      write(root, "n/top.txt")
      yield* eventually(() =>
        expect(fold(w.seen)).toEqual([
          { path: "n", kind: "upsert" },
          { path: "n/m", kind: "upsert" },
          { path: "n/top.txt", kind: "upsert" },
          { path: "n/m/o", kind: "upsert" },
          { path: "n/m/o/deep.txt", kind: "upsert" }
        ])
      )
      write(root, "n/m/o/later.txt") // the new directories are watched, too
      yield* eventually(() => expect(w.has("add", "n/m/o/later.txt")).toBe(true))
    }))

  it.scopedLive("rm -rf of a directory: unlinkDir for it, folding to ONE remove", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      write(root, "d/x.txt")
      write(root, "d/e/y.txt")
      write(root, "other.txt")
      const w = yield* record({ root })
      fs.rmSync(path.join(root, "d"), { recursive: true })
      yield* eventually(() => {
        expect(w.has("unlinkDir", "d")).toBe(true)
        expect(w.has("unlink", "d/x.txt")).toBe(true) // file unlinks come ~100 ms late (atomic)
        expect(w.has("unlink", "d/e/y.txt")).toBe(true)
      })
      expect(fold(w.seen)).toEqual([{ path: "d", kind: "remove" }])
      expect(w.seen.some((e) => e.path === "other.txt")).toBe(false)
    }))

  it.scopedLive("a file replaced by a directory: addDir, or unlink when such a directory is excluded", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      write(root, "x")
      write(root, "build")
      const w = yield* record({ root, excludes: fromPatterns(["build/"]) })
      fs.rmSync(path.join(root, "x"))
      fs.mkdirSync(path.join(root, "x"))
      fs.rmSync(path.join(root, "build"))
      fs.mkdirSync(path.join(root, "build"))
      yield* eventually(() => {
        expect(fold(w.seen.filter((e) => e.path === "x"))).toEqual([{ path: "x", kind: "upsert" }])
        expect(w.seen.filter((e) => e.path === "x").at(-1)?.kind).toBe("addDir")
        expect(fold(w.seen.filter((e) => e.path === "build"))).toEqual([{ path: "build", kind: "remove" }])
      })
    }))

  it.scopedLive("excluded files and directories produce no events", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      const w = yield* record({ root, excludes: fromPatterns(["*.log", "build/", "!keep.log"]) })
      write(root, "a.log")
      write(root, "sub/b.log")
      write(root, "build/out.js")
      write(root, "keep.log")
      write(root, "build.txt")
      write(root, "zz-sentinel.txt")
      yield* eventually(() => {
        expect(w.has("add", "zz-sentinel.txt")).toBe(true)
        expect(w.has("add", "keep.log")).toBe(true)
        expect(w.has("add", "build.txt")).toBe(true)
        expect(w.has("add", "sub/b.log") || w.has("addDir", "sub")).toBe(true)
      })
      const paths = w.seen.map((e) => e.path)
      expect(paths).not.toContain("a.log")
      expect(paths).not.toContain("sub/b.log")
      expect(paths.filter((p) => p === "build" || p.startsWith("build/"))).toEqual([])
    }))

  it.scopedLive("an excluded directory is never watched, neither at start nor when created later", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      for (let i = 0; i < 20; i++) write(root, `node_modules/pkg${i}/index.js`)
      write(root, "src/a.ts")
      yield* noWatchHandles
      const w = yield* record({ root, excludes: fromPatterns(["node_modules/"]) })
      const watchedAtStart = Object.keys(yield* w.handle.watched)
      expect(watchedAtStart).toContain("")
      expect(watchedAtStart).toContain("src")
      expect(watchedAtStart.filter((d) => d.includes("node_modules"))).toEqual([])
      expect((yield* w.handle.watched)[""]).not.toContain("node_modules")
      // root, src, src/a.ts: a handful of fs.watch handles, not one per file under node_modules
      expect(fsWatchHandles()).toBeLessThan(10)

      write(root, "src/node_modules/dep/index.js") // created while watching
      write(root, "node_modules/pkg0/new.js")
      write(root, "src/zz-sentinel.ts")
      yield* eventually(() => expect(w.has("add", "src/zz-sentinel.ts")).toBe(true))
      expect(w.seen.filter((e) => e.path.includes("node_modules"))).toEqual([])
      expect(Object.keys(yield* w.handle.watched).filter((d) => d.includes("node_modules"))).toEqual([])
    }))

  it.scopedLive("followSymLinks: false reports a symlink as an entry and does not traverse it", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      const outside = yield* tmpDir
      write(root, "real/f.txt")
      write(outside, "o.txt")
      const w = yield* record({ root, followSymLinks: false })
      fs.symlinkSync("real", path.join(root, "dirlink"))
      fs.symlinkSync(outside, path.join(root, "outlink"))
      fs.symlinkSync("real/f.txt", path.join(root, "filelink"))
      yield* eventually(() => {
        expect(w.has("add", "dirlink")).toBe(true)
        expect(w.has("add", "outlink")).toBe(true)
        expect(w.has("add", "filelink")).toBe(true)
      })
      write(outside, "p.txt")
      write(root, "real/g.txt")
      yield* eventually(() => expect(w.has("add", "real/g.txt")).toBe(true))
      expect(w.seen.filter((e) => e.path.startsWith("dirlink/") || e.path.startsWith("outlink/"))).toEqual([])
      expect(w.seen.filter((e) => e.kind === "addDir")).toEqual([])
    }))

  it.scopedLive("followSymLinks: false reports a dangling symlink, in a subdirectory too, and its removal", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      write(root, "sub/keep.txt")
      const w = yield* record({ root, followSymLinks: false })
      fs.symlinkSync("../nowhere", path.join(root, "dangling"))
      fs.symlinkSync("missing", path.join(root, "sub/broken"))
      yield* eventually(() => {
        expect(w.has("add", "dangling")).toBe(true)
        expect(w.has("add", "sub/broken")).toBe(true)
      })
      fs.unlinkSync(path.join(root, "sub/broken"))
      yield* eventually(() => expect(w.has("unlink", "sub/broken")).toBe(true))
    }))

  it.scopedLive("a burst of 300 files into 17 new directories: every file is reported", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      const w = yield* record({ root })
      for (let i = 0; i < 300; i++) write(root, `burst/d${i % 17}/f${i}.txt`)
      for (let i = 0; i < 300; i += 3) fs.writeFileSync(path.join(root, `burst/d${i % 17}/f${i}.txt`), "v2")
      for (let i = 1; i < 300; i += 7) fs.rmSync(path.join(root, `burst/d${i % 17}/f${i}.txt`))
      yield* eventually(() => {
        for (let i = 0; i < 300; i++) {
          if (i % 7 !== 1) expect(w.has("add", `burst/d${i % 17}/f${i}.txt`)).toBe(true)
        }
      })
    }))

  it.scopedLive("a burst of nested new directories: every file is reported", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      const w = yield* record({ root })
      for (let i = 0; i < 60; i++) write(root, `tree/n${i}/a/b/f${i}.txt`)
      yield* eventually(() => {
        for (let i = 0; i < 60; i++) expect(w.has("add", `tree/n${i}/a/b/f${i}.txt`)).toBe(true)
      })
    }))

  it.scopedLive("re-reading a busy directory reports nothing that chokidar already knew", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      for (let i = 0; i < 50; i++) write(root, `dir/old${i}.txt`)
      const w = yield* record({ root })
      write(root, "dir/new.txt")
      yield* eventually(() => expect(w.has("add", "dir/new.txt")).toBe(true))
      yield* Effect.sleep("400 millis") // past the re-read
      expect(w.seen.filter((e) => e.path.startsWith("dir/old"))).toEqual([])
    }))

  it.scopedLive("reports a chmod of a file that was read since it was written", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      write(root, "run.sh")
      const w = yield* record({ root })
      fs.readFileSync(path.join(root, "run.sh"))
      fs.chmodSync(path.join(root, "run.sh"), 0o755)
      yield* eventually(() => expect(w.has("change", "run.sh")).toBe(true))
    }))

  it.scopedLive("followSymLinks: true traverses a symlinked directory", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      const outside = yield* tmpDir
      write(outside, "o.txt")
      const w = yield* record({ root, followSymLinks: true })
      fs.symlinkSync(outside, path.join(root, "outlink"))
      yield* eventually(() => {
        expect(w.has("addDir", "outlink")).toBe(true)
        expect(w.has("add", "outlink/o.txt")).toBe(true)
      })
      write(outside, "p.txt")
      yield* eventually(() => expect(w.has("add", "outlink/p.txt")).toBe(true))
    }))

  it.scopedLive("closing the scope (interrupting) closes the watcher: no fs.watch handle is left", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      write(root, "a/b/c.txt")
      yield* noWatchHandles
      const scope = yield* Scope.make()
      const handle = yield* start({ root, excludes: none, followSymLinks: false }).pipe(Scope.extend(scope))
      expect(fsWatchHandles()).toBeGreaterThan(0)
      expect(Object.keys(yield* handle.watched)).toContain("a/b")
      yield* Scope.close(scope, Exit.void)
      expect(yield* handle.watched).toEqual({})
      yield* noWatchHandles
    }))

  it.scopedLive("interrupting a running `watch` stream closes its watcher", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      yield* noWatchHandles
      const fiber = yield* watch({ root, excludes: none, followSymLinks: false }).pipe(Stream.runDrain, Effect.fork)
      yield* eventually(() => expect(fsWatchHandles()).toBeGreaterThan(0))
      const exit = yield* Fiber.interrupt(fiber)
      expect(Exit.isInterrupted(exit)).toBe(true)
      yield* noWatchHandles
    }))

  it.scopedLive("the root disappearing fails the stream with WatchError RootRemoved", () =>
    Effect.gen(function*() {
      const parent = yield* tmpDir
      const root = path.join(parent, "project")
      write(root, "src/a.ts")
      const w = yield* record({ root })
      fs.rmSync(root, { recursive: true })
      yield* eventually(() => expect(Option.isSome(w.end())).toBe(true))
      const exit = Option.getOrThrow(w.end())
      expect(Exit.isFailure(exit)).toBe(true)
      if (Exit.isFailure(exit)) {
        const error = Option.getOrThrow(Cause.failureOption(exit.cause))
        expect(error).toBeInstanceOf(WatchError)
        expect(error.reason).toBe("RootRemoved")
        expect(error.root).toBe(root)
      }
      // no removals were reported once the root was gone (the sync program must not mirror them)
      expect(w.seen.filter((e) => e.kind === "unlink" || e.kind === "unlinkDir")).toEqual([])
    }))

  it.scopedLive("a missing root fails `start` with RootMissing", () =>
    Effect.gen(function*() {
      const parent = yield* tmpDir
      const error = yield* Effect.flip(start({ root: path.join(parent, "nope"), excludes: none, followSymLinks: false }))
      expect(error).toBeInstanceOf(WatchError)
      expect(error.reason).toBe("RootMissing")
      const file = path.join(parent, "file")
      fs.writeFileSync(file, "")
      expect((yield* Effect.flip(start({ root: file, excludes: none, followSymLinks: false }))).reason).toBe("RootMissing")
    }))

  it.scopedLive("the live layer provides the same watcher", () =>
    Effect.gen(function*() {
      const root = yield* tmpDir
      const watcher = yield* Watcher
      const handle = yield* watcher.start({ root, excludes: none, followSymLinks: false })
      write(root, "x.txt")
      const first = yield* handle.events.pipe(Stream.take(1), Stream.runCollect)
      expect([...first]).toEqual([{ kind: "add", path: "x.txt" }])
    }).pipe(Effect.provide(WatcherLive)))
})

describe("Watcher.layerTest", () => {
  it.effect("replays the events offered to its queue", () =>
    Effect.gen(function*() {
      const queue = yield* Queue.unbounded<FileEvent>()
      yield* Queue.offerAll(queue, [{ kind: "add", path: "a" }, { kind: "unlink", path: "b" }])
      const watcher = yield* Effect.provide(Watcher, layerTest(queue))
      const events = yield* watcher.watch({ root: "/nowhere", excludes: none, followSymLinks: false }).pipe(
        Stream.take(2),
        Stream.runCollect
      )
      expect([...events]).toEqual([{ kind: "add", path: "a" }, { kind: "unlink", path: "b" }])
    }))
})

import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Fiber, Queue, Ref, Stream, TestClock } from "effect"
import { coalesce, fold } from "../src/programs/coalesce.js"
import type { Change, FileEvent } from "../src/schemas/FileEvent.js"

const ev = (kind: FileEvent["kind"], path: string): FileEvent => ({ kind, path })
const up = (path: string): Change => ({ path, kind: "upsert" })
const rm = (path: string): Change => ({ path, kind: "remove" })

describe("fold", () => {
  const table: ReadonlyArray<readonly [string, ReadonlyArray<FileEvent>, ReadonlyArray<Change>]> = [
    ["add = upsert", [ev("add", "a")], [up("a")]],
    ["change = upsert", [ev("change", "a")], [up("a")]],
    ["unlink = remove", [ev("unlink", "a")], [rm("a")]],
    ["add then unlink = nothing", [ev("add", "a"), ev("unlink", "a")], []],
    ["unlink then add = upsert", [ev("unlink", "a"), ev("add", "a")], [up("a")]],
    ["change + change = one upsert", [ev("change", "a"), ev("change", "a")], [up("a")]],
    ["change then unlink = remove", [ev("change", "a"), ev("unlink", "a")], [rm("a")]],
    ["add, unlink, add = upsert", [ev("add", "a"), ev("unlink", "a"), ev("add", "a")], [up("a")]],
    ["unlink, add, unlink = remove", [ev("unlink", "a"), ev("add", "a"), ev("unlink", "a")], [rm("a")]],
    ["addDir then unlinkDir = nothing", [ev("addDir", "d"), ev("unlinkDir", "d")], []],
    ["unlinkDir then addDir = upsert", [ev("unlinkDir", "d"), ev("addDir", "d")], [up("d")]],
    [
      "mkdir with children, created quickly",
      [ev("addDir", "d"), ev("add", "d/f"), ev("addDir", "d/e"), ev("add", "d/e/g"), ev("change", "d/f")],
      [up("d"), up("d/e"), up("d/f"), up("d/e/g")]
    ],
    [
      "rm -rf d (children first, as the kernel does) = ONE remove of d",
      [ev("unlink", "d/x"), ev("unlink", "d/y/z"), ev("unlinkDir", "d/y"), ev("unlinkDir", "d")],
      [rm("d")]
    ],
    [
      "rm -rf d (chokidar: directories first, files' unlinks late) = ONE remove of d",
      [ev("unlinkDir", "d/y"), ev("unlinkDir", "d"), ev("unlink", "d/x"), ev("unlink", "d/y/z")],
      [rm("d")]
    ],
    [
      "rm -rf d && mkdir d && touch d/f = upsert d, upsert d/f (no lost write)",
      [ev("unlink", "d/f"), ev("unlinkDir", "d"), ev("addDir", "d"), ev("add", "d/f")],
      [up("d"), up("d/f")]
    ],
    [
      "… also when chokidar reports it as unlinkDir d, addDir d, change d/f",
      [ev("unlinkDir", "d"), ev("addDir", "d"), ev("change", "d/f")],
      [up("d"), up("d/f")]
    ],
    [
      "rm -rf d && mkdir d: other old children still need removing",
      [ev("unlink", "d/old"), ev("unlinkDir", "d"), ev("addDir", "d"), ev("add", "d/new")],
      [rm("d/old"), up("d"), up("d/new")]
    ],
    [
      "writes inside d before rm -rf d are superseded",
      [ev("add", "d/f"), ev("change", "d/g"), ev("unlinkDir", "d")],
      [rm("d")]
    ],
    [
      "mkdir d, touch d/f, rm -rf d = nothing",
      [ev("addDir", "d"), ev("add", "d/f"), ev("unlinkDir", "d"), ev("unlink", "d/f")],
      []
    ],
    [
      "a file written, then its directory removed and re-created: the file is gone",
      [ev("change", "d/f"), ev("unlinkDir", "d"), ev("addDir", "d")],
      [rm("d/f"), up("d")]
    ],
    [
      "removes are not collapsed into a sibling with a common prefix",
      [ev("unlinkDir", "ab"), ev("unlink", "abc"), ev("unlink", "ab/c")],
      [rm("ab"), rm("abc")]
    ],
    [
      "order: removes first (by path), then upserts by depth, then path",
      [ev("add", "z/y/x"), ev("add", "b"), ev("unlink", "q"), ev("addDir", "z"), ev("unlink", "c"), ev("addDir", "z/y"), ev("add", "a")],
      [rm("c"), rm("q"), up("a"), up("b"), up("z"), up("z/y"), up("z/y/x")]
    ]
  ]
  for (const [name, events, expected] of table) {
    it(name, () => {
      expect(fold(events)).toEqual(expected)
    })
  }
})

// ---- coalesce under TestClock ---------------------------------------------------------------

/** Runs `coalesce` over a queue in a fiber; returns the input queue and a way to read the batches so far. */
const harness = (options?: { quietMs?: number; maxWaitMs?: number }) =>
  Effect.gen(function*() {
    const input = yield* Queue.unbounded<FileEvent>()
    const batches = yield* Ref.make<ReadonlyArray<ReadonlyArray<Change>>>([])
    const fiber = yield* coalesce(Stream.fromQueue(input), options).pipe(
      Stream.runForEach((b) => Ref.update(batches, (bs) => [...bs, b])),
      Effect.fork
    )
    const offer = (...events: ReadonlyArray<FileEvent>) => Queue.offerAll(input, events).pipe(Effect.zipRight(settle))
    return { input, batches: Ref.get(batches), fiber, offer }
  })

/** Let the coalescer fibers run until they wait on the clock or the queue. */
const settle = Effect.gen(function*() {
  for (let i = 0; i < 20; i++) yield* Effect.yieldNow()
})
const adjust = (ms: number) => TestClock.adjust(ms).pipe(Effect.zipRight(settle))

describe("coalesce", () => {
  it.effect("events within the quiet window land in one batch", () =>
    Effect.gen(function*() {
      const h = yield* harness({ quietMs: 3, maxWaitMs: 50 })
      yield* h.offer(ev("add", "a"))
      yield* adjust(2)
      yield* h.offer(ev("change", "b"))
      yield* adjust(2) // 4 ms after the first, 2 after the last: still open
      expect(yield* h.batches).toEqual([])
      yield* h.offer(ev("change", "a"))
      yield* adjust(2)
      expect(yield* h.batches).toEqual([])
      yield* adjust(1) // quiet for 3 ms
      expect(yield* h.batches).toEqual([[up("a"), up("b")]])
    }))

  it.effect("a single event is emitted after exactly the quiet window, not before", () =>
    Effect.gen(function*() {
      const h = yield* harness({ quietMs: 3, maxWaitMs: 50 })
      yield* h.offer(ev("change", "a"))
      yield* adjust(2)
      expect(yield* h.batches).toEqual([])
      yield* adjust(1)
      expect(yield* h.batches).toEqual([[up("a")]])
    }))

  it.effect("a continuous stream of events is cut at maxWait", () =>
    Effect.gen(function*() {
      const h = yield* harness({ quietMs: 3, maxWaitMs: 50 })
      for (let t = 0; t < 49; t += 2) {
        yield* h.offer(ev("change", `f${t}`))
        yield* adjust(2)
      }
      // 50 ms since the first event: the batch is cut although events keep coming
      expect(yield* h.batches).toHaveLength(1)
      expect((yield* h.batches)[0]).toHaveLength(25)
      yield* h.offer(ev("change", "late"))
      yield* adjust(3)
      const batches = yield* h.batches
      expect(batches).toHaveLength(2)
      expect(batches[1]).toEqual([up("late")])
    }))

  it.effect("two bursts separated by more than quiet are two batches", () =>
    Effect.gen(function*() {
      const h = yield* harness({ quietMs: 3, maxWaitMs: 50 })
      yield* h.offer(ev("add", "a"), ev("change", "a"))
      yield* adjust(4)
      yield* h.offer(ev("unlink", "a"))
      yield* adjust(3)
      expect(yield* h.batches).toEqual([[up("a")], [rm("a")]])
    }))

  it.effect("an empty fold emits nothing; the next burst still comes through", () =>
    Effect.gen(function*() {
      const h = yield* harness()
      yield* h.offer(ev("add", "tmp"), ev("unlink", "tmp"))
      yield* adjust(10)
      expect(yield* h.batches).toEqual([])
      yield* h.offer(ev("add", "b"))
      yield* adjust(10)
      expect(yield* h.batches).toEqual([[up("b")]])
    }))

  it.effect("the upstream's end flushes the open batch, then the stream ends", () =>
    Effect.gen(function*() {
      const events = Stream.make(ev("add", "a"), ev("add", "b"))
      const fiber = yield* coalesce(events).pipe(Stream.runCollect, Effect.fork)
      yield* adjust(1)
      expect(Chunk.toArray(yield* Fiber.join(fiber))).toEqual([[up("a"), up("b")]])
    }))

  it.effect("the upstream's failure comes after the batch gathered so far", () =>
    Effect.gen(function*() {
      const events = Stream.make(ev("add", "a")).pipe(Stream.concat(Stream.fail("boom" as const)))
      const seen: Array<ReadonlyArray<Change>> = []
      const fiber = yield* coalesce(events).pipe(
        Stream.runForEach((b) => Effect.sync(() => seen.push(b))),
        Effect.flip,
        Effect.fork
      )
      yield* adjust(1)
      expect(yield* Fiber.join(fiber)).toBe("boom")
      expect(seen).toEqual([[up("a")]])
    }))

  // Property-style: random file operations with random gaps (inside and outside the quiet window)
  // go through the coalescer; a destination that applies the batches must end equal to the source.
  // (Each seed is its own test: TestClock's bookkeeping grows with the fibers of a test.)
  for (let seed = 1; seed <= 12; seed++) {
    it.effect(`nothing is dropped: random operations converge a simulated destination (seed ${seed})`, () =>
      Effect.gen(function*() {
        const random = mulberry32(seed)
        const local = new Model()
        const remote = new Model()
        const h = yield* harness({ quietMs: 3, maxWaitMs: 12 })
        let applied = 0
        const apply = Effect.gen(function*() {
          const batches = yield* h.batches
          for (; applied < batches.length; applied++) remote.apply(batches[applied], local)
        })
        let events = 0
        for (let step = 0; step < 50; step++) {
          const happened = local.randomOperation(random)
          events += happened.length
          yield* h.offer(...happened)
          if (random() < 0.4) yield* adjust(1 + Math.floor(random() * 5)) // 1..5 ms
          yield* apply
        }
        yield* adjust(100)
        yield* apply
        expect(events).toBeGreaterThan(50)
        expect(Object.keys(local.dump()).length).toBeGreaterThan(0)
        expect(remote.dump()).toEqual(local.dump())
      }))
  }
})

// ---- a tiny file tree model for the property test -----------------------------------------

const mulberry32 = (seed: number) => () => {
  seed = (seed + 0x6D2B79F5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}

type Entry = { readonly dir: true } | { readonly dir: false; readonly version: number }

class Model {
  readonly entries = new Map<string, Entry>()
  private version = 0

  dump(): Record<string, string> {
    const out: Record<string, string> = {}
    for (const [p, e] of [...this.entries].sort(([a], [b]) => (a < b ? -1 : 1))) {
      out[p] = e.dir ? "dir" : `v${e.version}`
    }
    return out
  }

  private set(p: string, e: Entry): void {
    const parts = p.split("/")
    for (let i = 1; i < parts.length; i++) this.entries.set(parts.slice(0, i).join("/"), { dir: true })
    this.entries.set(p, e)
  }

  private removeTree(p: string): void {
    for (const k of [...this.entries.keys()]) if (k === p || k.startsWith(`${p}/`)) this.entries.delete(k)
  }

  /** What a destination does with a batch: upserts copy the *current* local state. */
  apply(changes: ReadonlyArray<Change>, local: Model): void {
    for (const c of changes) {
      if (c.kind === "remove") this.removeTree(c.path)
      else {
        const e = local.entries.get(c.path)
        if (e === undefined) continue // gone again: a later event will say so
        if (e.dir) this.set(c.path, e)
        else this.set(c.path, e)
      }
    }
  }

  /** Performs a random operation on this (local) tree, returning chokidar-like events. */
  randomOperation(random: () => number): ReadonlyArray<FileEvent> {
    const names = ["a", "b", "c"]
    const pick = <A>(xs: ReadonlyArray<A>): A => xs[Math.floor(random() * xs.length)]
    const dirs = ["", ...[...this.entries].filter(([, e]) => e.dir).map(([p]) => p)]
    const parent = pick(dirs)
    const child = parent === "" ? pick(names) : `${parent}/${pick(names)}`
    const existing = this.entries.get(child)
    const r = random()
    if (existing === undefined) {
      if (r < 0.5) {
        this.set(child, { dir: false, version: ++this.version })
        return [ev("add", child)]
      }
      this.set(child, { dir: true })
      return [ev("addDir", child)]
    }
    if (!existing.dir) {
      if (r < 0.6) {
        this.set(child, { dir: false, version: ++this.version })
        return [ev("change", child)]
      }
      this.entries.delete(child)
      return [ev("unlink", child)]
    }
    // a directory: rm -rf it (events deepest first, or directories first like chokidar), maybe re-create
    const under = [...this.entries].filter(([p]) => p.startsWith(`${child}/`)).sort(([a], [b]) => b.length - a.length)
    const events: Array<FileEvent> = []
    const unlinks = under.map(([p, e]) => ev(e.dir ? "unlinkDir" : "unlink", p))
    if (random() < 0.5) events.push(...unlinks, ev("unlinkDir", child))
    else events.push(ev("unlinkDir", child), ...unlinks.filter((e) => e.kind === "unlinkDir"), ...unlinks.filter((e) => e.kind === "unlink"))
    this.removeTree(child)
    if (r < 0.4) {
      this.set(child, { dir: true })
      events.push(ev("addDir", child))
      const f = `${child}/${pick(names)}`
      this.set(f, { dir: false, version: ++this.version })
      events.push(ev("add", f))
    }
    return events
  }
}

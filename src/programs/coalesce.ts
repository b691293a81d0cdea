/**
 * The coalescer of the live path: folds bursts of watcher events per path over a short quiet
 * window, so a save (or `npm install`, or `rm -rf`) reaches the destinations as one batch of net
 * changes instead of one message per raw event.
 *
 * A batch opens with the first event and is emitted when no event has arrived for `quietMs`, or
 * `maxWaitMs` after it opened, whichever comes first. Every event lands in exactly one batch;
 * nothing is dropped (no `Stream.debounce`), and there is no fixed cadence (no `groupedWithin`).
 * Time comes from `Clock`, so tests drive it with `TestClock`.
 */
import { Clock, Effect, Either, Mailbox, Option, Stream } from "effect"
import type { Change, FileEvent } from "../schemas/FileEvent.js"

export const DEFAULT_QUIET_MS = 2
export const DEFAULT_MAX_WAIT_MS = 50

// ---- fold ---------------------------------------------------------------------------------------

const isRemoval = (kind: FileEvent["kind"]): boolean => kind === "unlink" || kind === "unlinkDir"
const depth = (p: string): number => p.split("/").length
const ancestors = (p: string): Array<string> => {
  const out: Array<string> = []
  for (let i = p.indexOf("/"); i !== -1; i = p.indexOf("/", i + 1)) out.push(p.slice(0, i))
  return out
}

interface PathHistory {
  first: number
  firstKind: FileEvent["kind"]
  last: number
  lastKind: FileEvent["kind"]
  /** Index of the last unlink/unlinkDir of this path, or -1. */
  lastRemoval: number
  firstRemoval: number
}

/**
 * The net changes of a batch of events (pure). Per path, in event order:
 * - the path ends present (last event add/change/addDir) → `upsert`;
 * - it ends absent and existed before the batch (first event change/unlink/unlinkDir) → `remove`;
 * - it was created and removed within the batch → nothing.
 *
 * The removal of a directory also removes its descendants at that point of the batch, so a
 * descendant's earlier events are superseded by it (`touch d/f; rm -rf d` leaves nothing for
 * `d/f`), while later ones are kept (`rm -rf d; mkdir d; touch d/f` ends as upsert `d`, upsert
 * `d/f`: no lost write). Removes of descendants of a removed directory are dropped: one remove of
 * `d` stands for the whole subtree.
 *
 * Output: removes first (by path), then upserts, parents before children (by depth, then path).
 */
export const fold = (events: ReadonlyArray<FileEvent>): ReadonlyArray<Change> => {
  const byPath = new Map<string, PathHistory>()
  events.forEach((e, i) => {
    const h = byPath.get(e.path)
    const removal = isRemoval(e.kind) ? i : -1
    if (h === undefined) {
      byPath.set(e.path, {
        first: i,
        firstKind: e.kind,
        last: i,
        lastKind: e.kind,
        lastRemoval: removal,
        firstRemoval: removal
      })
    } else {
      h.last = i
      h.lastKind = e.kind
      if (removal !== -1) {
        h.lastRemoval = removal
        if (h.firstRemoval === -1) h.firstRemoval = removal
      }
    }
  })

  const result = new Map<string, Change["kind"]>()
  for (const [p, h] of byPath) {
    // An ancestor's removal is an implicit removal of this path at that index.
    let firstImplicit = Infinity
    let lastImplicit = -1
    for (const a of ancestors(p)) {
      const ah = byPath.get(a)
      if (ah === undefined || ah.lastRemoval === -1) continue
      firstImplicit = Math.min(firstImplicit, ah.firstRemoval)
      lastImplicit = Math.max(lastImplicit, ah.lastRemoval)
    }
    // Unknown (an ancestor was removed before we heard of this path): assume it existed.
    const existedBefore = h.first < firstImplicit ? !(h.firstKind === "add" || h.firstKind === "addDir") : true
    const presentAfter = h.last > lastImplicit && !isRemoval(h.lastKind)
    if (presentAfter) result.set(p, "upsert")
    else if (existedBefore) result.set(p, "remove")
  }

  const removes: Array<Change> = []
  const upserts: Array<Change> = []
  for (const [p, kind] of result) {
    if (kind === "upsert") upserts.push({ path: p, kind })
    else if (!ancestors(p).some((a) => result.get(a) === "remove")) removes.push({ path: p, kind })
  }
  removes.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0))
  upserts.sort((a, b) => depth(a.path) - depth(b.path) || (a.path < b.path ? -1 : a.path > b.path ? 1 : 0))
  return [...removes, ...upserts]
}

// ---- coalesce -----------------------------------------------------------------------------------

export interface CoalesceOptions {
  /** Emit the batch once no event has arrived for this long. Default 2 ms. */
  readonly quietMs?: number
  /** …but never later than this after the batch's first event. Default 50 ms. */
  readonly maxWaitMs?: number
}

/**
 * Folds `events` into batches of net changes (see `fold`). An empty fold emits nothing. When the
 * upstream ends or fails, the batch being gathered is emitted first, then the stream ends or fails.
 */
export const coalesce = <E, R>(
  events: Stream.Stream<FileEvent, E, R>,
  options: CoalesceOptions = {}
): Stream.Stream<ReadonlyArray<Change>, E, R> => {
  const quietMs = Math.max(0, options.quietMs ?? DEFAULT_QUIET_MS)
  const maxWaitMs = Math.max(quietMs, options.maxWaitMs ?? DEFAULT_MAX_WAIT_MS)
  return Stream.unwrapScoped(Effect.gen(function*() {
    const inbox = yield* Mailbox.make<FileEvent, E>()
    // The upstream runs in its own fiber, owned by this stream's scope; its end or failure
    // completes the inbox after everything it produced.
    yield* events.pipe(
      Stream.runForEachChunk((chunk) => inbox.offerAll(chunk)),
      Mailbox.into(inbox),
      Effect.forkScoped
    )

    /** The upstream's failure, once seen while a batch was open: emit the batch, then fail. */
    let ended: Option.Option<Option.Option<E>> = Option.none()

    const nextBatch: Effect.Effect<ReadonlyArray<FileEvent>, Option.Option<E>> = Effect.gen(function*() {
      if (Option.isSome(ended)) return yield* Effect.fail(ended.value)
      const opened = yield* Effect.either(inbox.takeAll) // waits for at least one event, or the end
      if (Either.isLeft(opened)) return yield* Effect.fail(Option.some(opened.left))
      const batch: Array<FileEvent> = Array.from(opened.right[0])
      // `done`: the upstream is over and drained; the next `takeAll` reports how it ended.
      if (opened.right[1]) {
        if (batch.length === 0) return yield* Effect.fail(Option.none())
        return batch
      }
      const start = yield* Clock.currentTimeMillis
      let lastArrival = start
      while (true) {
        const now = yield* Clock.currentTimeMillis
        const deadline = Math.min(lastArrival + quietMs, start + maxWaitMs)
        if (now >= deadline) break
        // Racing `takeAll` is safe: it removes messages only in the step that returns them.
        const more = yield* inbox.takeAll.pipe(Effect.either, Effect.timeoutOption(deadline - now))
        if (Option.isNone(more)) break
        if (Either.isLeft(more.value)) {
          ended = Option.some(Option.some(more.value.left))
          break
        }
        const [messages, done] = more.value.right
        for (const m of messages) batch.push(m)
        if (done) break
        lastArrival = yield* Clock.currentTimeMillis
      }
      return batch
    })

    return Stream.repeatEffectOption(nextBatch).pipe(
      Stream.map(fold),
      Stream.filter((changes) => changes.length > 0)
    )
  }))
}

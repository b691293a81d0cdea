/**
 * Watcher: chokidar 5 as a scoped stream of `FileEvent`s for one project root.
 *
 * - No initial events (`ignoreInitial`): the initial state is reconciliation's job. `start`
 *   completes only after chokidar's `ready`, so anything that happens after it is reported; start
 *   the watch *before* scanning for reconciliation.
 * - Excluded directories are pruned: chokidar's `ignored` sees them with their stats and never
 *   reads or watches inside them. Events are filtered by the same matcher as a safety net.
 * - `followSymLinks: false`: a symlink is an entry of its own (`add`/`change`/`unlink` on the link
 *   path), never traversed. chokidar drops a *dangling* symlink in this mode (its realpath fails),
 *   so those are picked out of chokidar's raw `fs.watch` events of the parent directory.
 * - chokidar also drops a chmod of a file read since its last write, and throttles `change` to one
 *   per 50 ms; file changes are reported from the raw `fs.watch` events instead (see `onRaw`).
 *   `true`: links are followed and their targets' contents appear under the link path.
 * - Low latency: native `fs.watch`, no polling, no `awaitWriteFinish`. chokidar's `atomic` stays
 *   on by default (an `unlink` followed within 100 ms by an `add` of the same path becomes one
 *   `change`, which hides editors' save-by-rename; the price is that `unlink` events of files are
 *   delivered 100 ms late, and names like `*.swp`, `*~`, `.subl*.tmp` are never reported).
 * - chokidar drops a second `change` of a file within 50 ms of the first (and raw events within
 *   5 ms): a write right after another could be lost. The watcher re-stats every file it reported
 *   `SETTLE_MS` later and reports a `change` if size/mtime/ctime/inode moved since.
 * - A file replaced by a directory shows up in chokidar as a `change` of the file. It is reported
 *   as `addDir` (or as `unlink` of the file if the directory is excluded). chokidar does not watch
 *   inside such a directory: the sync program should scan it (reconcile that subtree).
 * - The root disappearing (or being replaced) fails the stream with `WatchError` reason
 *   `"RootRemoved"`; removals noticed after the root is already gone are not emitted. Any other
 *   chokidar error fails it with reason `"WatchFailed"`. Permission errors are not errors here
 *   (`ignorePermissionErrors`): an unreadable entry is reported and fails later, when read.
 */
import * as chokidar from "chokidar"
import { Context, Data, Deferred, Effect, Exit, Layer, Mailbox, type Queue, type Scope, Stream } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import type { FileEvent } from "../schemas/FileEvent.js"
import type { Excludes } from "./Excludes.js"

// ---- errors -----------------------------------------------------------------------------------

export class WatchError extends Data.TaggedError("WatchError")<{
  readonly root: string
  /**
   * - `RootMissing`: the root does not exist or is not a directory when the watch starts.
   * - `RootRemoved`: the root was removed, moved away or replaced while watched. Halt; do not
   *   propagate removals to the destinations (DESIGN §5 "Safety").
   * - `WatchFailed`: chokidar reported an error (e.g. ENOSPC: out of inotify watches, EMFILE).
   */
  readonly reason: "RootMissing" | "RootRemoved" | "WatchFailed"
  readonly cause: unknown
}> {
  override get message(): string {
    switch (this.reason) {
      case "RootMissing":
        return `cannot watch ${this.root}: not an existing directory`
      case "RootRemoved":
        return `${this.root} was removed or replaced while being watched`
      case "WatchFailed": {
        const cause = this.cause as NodeJS.ErrnoException | undefined
        return `watching ${this.root} failed: ${cause?.message ?? String(cause)}`
      }
    }
  }
}

// ---- interface --------------------------------------------------------------------------------

export interface WatchOptions {
  /** The project root (absolute, or relative to the cwd). */
  readonly root: string
  readonly excludes: Excludes
  readonly followSymLinks: boolean
  /** chokidar's `atomic` (see the module comment). Default true. */
  readonly atomic?: boolean
}

export interface WatchHandle {
  /** The events, from `ready` on. Ends never; fails with `WatchError`. */
  readonly events: Stream.Stream<FileEvent, WatchError>
  /**
   * The directories chokidar tracks, relative to the root (`""` = the root), with the entries it
   * tracks in each. Diagnostics and tests; empty once the watcher is closed.
   */
  readonly watched: Effect.Effect<Readonly<Record<string, ReadonlyArray<string>>>>
}

export class Watcher extends Context.Tag("sicksync/Watcher")<Watcher, {
  /**
   * Starts watching and completes once the watch is established (chokidar's `ready`). The watch
   * lives until the scope closes; events are buffered (unbounded) until the stream is read.
   */
  readonly start: (options: WatchOptions) => Effect.Effect<WatchHandle, WatchError, Scope.Scope>
  /** The same as a self-contained stream: watching starts when it is run and stops when it ends. */
  readonly watch: (options: WatchOptions) => Stream.Stream<FileEvent, WatchError>
}>() {}

// ---- chokidar implementation ------------------------------------------------------------------

/** How long after reporting a file the watcher checks it again (chokidar throttles for 50 ms). */
export const SETTLE_MS = 60

/** A raw event on a file not reported yet counts as a change only if its ctime is this recent. */
const RECENT_MS = 2_000

/** How long a directory must be quiet before it is read again to catch what chokidar missed. */
const RECHECK_MS = 150

const toRelative = (root: string, abs: string): string => {
  const rel = path.relative(root, abs)
  return path.sep === "/" ? rel : rel.split(path.sep).join("/")
}

const moved = (a: fs.Stats, b: fs.Stats): boolean =>
  a.size !== b.size || a.mtimeMs !== b.mtimeMs || a.ctimeMs !== b.ctimeMs || a.ino !== b.ino

export const start = Effect.fn("Watcher.start")(function*(options: WatchOptions) {
  const given = path.resolve(options.root)
  // Watch the real path: chokidar treats a symlinked root as a link, and the identity of the root
  // (device + inode) is what tells us later whether it is still the same directory.
  const { root, rootStats } = yield* Effect.try({
    try: () => {
      const root = fs.realpathSync(given)
      const rootStats = fs.statSync(root)
      if (!rootStats.isDirectory()) throw new Error(`not a directory: ${root}`)
      return { root, rootStats }
    },
    catch: (cause) => new WatchError({ root: given, reason: "RootMissing", cause })
  })
  const { excludes, followSymLinks } = options

  // `Stream.asyncPush` spelled out: the same unbounded mailbox, but created in the caller's scope
  // so that `start` can return only after `ready`.
  const mailbox = yield* Effect.acquireRelease(Mailbox.make<FileEvent, WatchError>(), (m) => m.shutdown)
  const ready = yield* Deferred.make<void, WatchError>()

  const rootStillThere = (): boolean => {
    const now = fs.statSync(root, { throwIfNoEntry: false })
    return now !== undefined && now.isDirectory() && now.ino === rootStats.ino && now.dev === rootStats.dev
  }
  const fail = (reason: WatchError["reason"], cause: unknown): void => {
    const error = new WatchError({ root: given, reason, cause })
    Deferred.unsafeDone(ready, Exit.fail(error)) // before `ready`: `start` fails (no-op after)
    mailbox.unsafeDone(Exit.fail(error)) // after: the stream fails once drained
  }

  const ignored = (abs: string, stats?: fs.Stats): boolean => {
    const rel = toRelative(root, abs)
    // chokidar also asks without stats (before it stats, and on removal): then it is only known
    // as "some path", checked as a file; directory-only patterns apply once it has the stats.
    return excludes.isExcluded(rel, stats?.isDirectory() ?? false)
  }

  const settle = new Map<string, ReturnType<typeof setTimeout>>()
  let closed = false
  const unsettle = (rel: string): void => {
    const t = settle.get(rel)
    if (t !== undefined) clearTimeout(t)
    settle.delete(rel)
  }
  const recheckLater = (rel: string, abs: string, seen: fs.Stats): void => {
    unsettle(rel)
    settle.set(
      rel,
      setTimeout(() => {
        settle.delete(rel)
        ;(followSymLinks ? fs.stat : fs.lstat)(abs, (err, now) => {
          if (closed || err || !now.isFile() || !moved(seen, now)) return
          if (mailbox.unsafeOffer({ kind: "change", path: rel })) recheckLater(rel, abs, now)
        })
      }, SETTLE_MS)
    )
  }

  const onEvent = (kind: FileEvent["kind"], abs: string, stats?: fs.Stats): void => {
    if (closed) return
    const rel = toRelative(root, abs)
    if (rel === "" || rel === ".." || rel.startsWith("../") || path.isAbsolute(rel)) {
      if (rel === "" && kind === "unlinkDir") fail("RootRemoved", new Error(`${root} was removed`))
      return
    }
    if (kind === "unlink" || kind === "unlinkDir") {
      unsettle(rel)
      if (!rootStillThere()) return fail("RootRemoved", new Error(`${root} is gone`))
    }
    if (kind === "change" && stats?.isFile()) {
      // Already reported from the raw event (chokidar's own `change` comes later, or not at all).
      if (reported.get(rel) === stats.ctimeMs) return
      reported.set(rel, stats.ctimeMs)
    }
    if (kind === "unlink") reported.delete(rel)
    if ((kind === "add" || kind === "change") && stats?.isDirectory()) {
      // chokidar's view of a file replaced by a directory: the file is gone, a directory is there
      kind = excludes.isExcluded(rel, true) ? "unlink" : "addDir"
    } else if (excludes.isExcluded(rel, kind === "addDir" || kind === "unlinkDir")) return
    mailbox.unsafeOffer({ kind, path: rel })
    if ((kind === "add" || kind === "change") && stats?.isFile()) recheckLater(rel, abs, stats)
    // Entries created before chokidar's watch on a new directory was in place can be missed.
    if (kind === "addDir") scheduleRecheck(abs)
  }

  /** Dangling links reported so far: chokidar does not track them, so their removal is ours to see. */
  const dangling = new Set<string>()
  /** The ctime of each file as last reported changed: a write or chmod moves it, a read does not. */
  const reported = new Map<string, number>()
  const inside = (rel: string) => rel !== "" && rel !== ".." && !rel.startsWith("../") && !path.isAbsolute(rel)

  /**
   * chokidar's raw `fs.watch` events, for what it drops or delays: a file's changes (it throttles
   * `change` to one per 50 ms and ignores a chmod of a file read since its last write), dangling
   * symlinks, and entries missed in a burst.
   */
  const onRaw = (event: string, name: unknown, details: unknown): void => {
    const watched = (details as { watchedPath?: unknown } | undefined)?.watchedPath
    if (closed || typeof name !== "string" || name === "" || typeof watched !== "string") return
    fs.lstat(watched, (err, self) => {
      if (closed || err) return
      if (self.isFile()) {
        // A file's own watch. A ctime that moved is a write or a chmod; a read (atime) leaves it
        // alone, but a file not reported yet has no known ctime: then only a recent one counts.
        const rel = toRelative(root, watched)
        if (event !== "change" || !inside(rel)) return
        const known = reported.get(rel)
        if (known === self.ctimeMs || (known === undefined && Date.now() - self.ctimeMs > RECENT_MS)) return
        return onEvent("change", watched, self)
      }
      if (!self.isDirectory()) return
      scheduleRecheck(watched)
      if (followSymLinks) return
      const abs = path.join(watched, name)
      const rel = toRelative(root, abs)
      if (!inside(rel)) return
      fs.lstat(abs, (err, st) => {
        if (closed) return
        if (err || !st.isSymbolicLink()) {
          if (dangling.delete(rel) && err?.code === "ENOENT") onEvent("unlink", abs)
          return
        }
        fs.stat(abs, (targetErr) => {
          if (closed) return
          if (!targetErr) {
            dangling.delete(rel) // a working link is chokidar's to report
            return
          }
          dangling.add(rel)
          onEvent("add", abs, st)
        })
      })
    })
  }

  /**
   * A directory with raw activity is read again once quiet: in a burst, chokidar can miss entries
   * for good (seen: files 150+ of 300 written at once into 17 directories). Entries chokidar does
   * not track are reported here and handed to it. Its `_getWatchedDir` is internal, but the only
   * way to ask what it tracks without copying every directory's listing (`getWatched()`).
   */
  const rechecks = new Map<string, ReturnType<typeof setTimeout>>()
  const scheduleRecheck = (dirAbs: string): void => {
    clearTimeout(rechecks.get(dirAbs))
    rechecks.set(
      dirAbs,
      setTimeout(() => {
        rechecks.delete(dirAbs)
        recheck(dirAbs, false)
      }, RECHECK_MS)
    )
  }
  const tracked = (dirAbs: string, name: string): boolean => {
    const internal = watcher as unknown as { _getWatchedDir?: (dir: string) => { has: (item: string) => boolean | undefined } }
    return internal._getWatchedDir?.(dirAbs).has(name) ?? true
  }
  /** Reports entries of `dirAbs` chokidar does not know (all of them when `all`: a directory it missed). */
  const recheck = (dirAbs: string, all: boolean): void => {
    fs.readdir(dirAbs, (err, names) => {
      if (closed || err) return
      for (const name of names) {
        if (!all && tracked(dirAbs, name)) continue
        const abs = path.join(dirAbs, name)
        const rel = toRelative(root, abs)
        if (!inside(rel) || dangling.has(rel)) continue
        ;(followSymLinks ? fs.stat : fs.lstat)(abs, (err, st) => {
          if (closed || err) return
          const isDir = st.isDirectory()
          if (excludes.isExcluded(rel, isDir)) return
          onEvent(isDir ? "addDir" : "add", abs, st)
          if (isDir) recheck(abs, true)
          if (!all) watcher.add(abs)
        })
      }
    })
  }

  const watcher = yield* Effect.acquireRelease(
    Effect.sync(() => {
      const w = chokidar.watch(root, {
        ignoreInitial: true,
        followSymlinks: followSymLinks,
        ignored,
        persistent: true,
        usePolling: false,
        ignorePermissionErrors: true,
        atomic: options.atomic ?? true
      })
      // Listeners are attached in the same tick as the watch starts: nothing can be missed.
      w.on("all", (event, abs, stats) => {
        if (event === "add" || event === "change" || event === "unlink" || event === "addDir" || event === "unlinkDir") {
          onEvent(event, abs, stats)
        }
      })
      w.on("raw", onRaw)
      w.on("error", (cause) => fail("WatchFailed", cause))
      w.once("ready", () => Deferred.unsafeDone(ready, Exit.void))
      return w
    }),
    (w) =>
      Effect.promise(() => {
        closed = true
        for (const t of settle.values()) clearTimeout(t)
        settle.clear()
        for (const t of rechecks.values()) clearTimeout(t)
        rechecks.clear()
        return w.close()
      })
  )

  yield* Deferred.await(ready)

  const watched = Effect.sync(() => {
    const out: Record<string, ReadonlyArray<string>> = {}
    for (const [dir, entries] of Object.entries(watcher.getWatched())) {
      const rel = toRelative(root, dir)
      if (rel === ".." || rel.startsWith("../") || path.isAbsolute(rel)) continue
      out[rel] = entries
    }
    return out
  })

  return { events: Mailbox.toStream(mailbox), watched } satisfies WatchHandle
})

export const watch = (options: WatchOptions): Stream.Stream<FileEvent, WatchError> =>
  Stream.unwrapScoped(Effect.map(start(options), (handle) => handle.events))

export const layer: Layer.Layer<Watcher> = Layer.succeed(Watcher, Watcher.of({ start, watch }))

// ---- test double ------------------------------------------------------------------------------

/**
 * A Watcher that ignores its options and replays what the test offers to `events` (for the sync
 * program's unit tests). Shutting the queue down ends the stream. `watched` is always empty.
 */
export const layerTest = (events: Queue.Dequeue<FileEvent>): Layer.Layer<Watcher> =>
  Layer.succeed(
    Watcher,
    Watcher.of({
      start: () => Effect.succeed({ events: Stream.fromQueue(events), watched: Effect.succeed({}) }),
      watch: () => Stream.fromQueue(events)
    })
  )

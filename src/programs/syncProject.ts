/**
 * syncProject: watcher → coalescer → one worker per destination.
 *
 * Each destination keeps its own dirty set (path → latest change) and a wake-up token, so a slow
 * or offline destination never delays the others and nothing queued for it is lost: changes made
 * while it is offline fold into the set (latest wins) and are sent when it is back.
 */
import { Clock, Data, Duration, Effect, Queue, Schedule, Stream } from "effect"
import * as fsSync from "node:fs"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import type { ResolvedDestination, ResolvedProject } from "../schemas/ConfigFile.js"
import type { Change, ChangeKind } from "../schemas/FileEvent.js"
import { CHUNK_BYTES } from "../schemas/Protocol.js"
import type { ConnectError } from "../services/DaemonLocator.js"
import { type Excludes, makeExcludes } from "../services/Excludes.js"
import {
  type Ack,
  type ConnectionLost,
  type FileSource,
  RemoteConnection,
  type Session,
  SourceChanged,
  SourceUnreadable
} from "../services/RemoteConnection.js"
import { type Bar, Progress } from "../services/Progress.js"
import { type DestinationState, Status } from "../services/Status.js"
import { Watcher } from "../services/Watcher.js"
import { coalesce } from "./coalesce.js"
import {
  checkSafety,
  defaultSafety,
  deletedCount,
  diff,
  type LocalTree,
  type SafetyOptions,
  type ScanError,
  scanLocal
} from "./reconcile.js"

export interface SyncOptions {
  /** Re-read a file this long after it was seen changing mid-read. */
  readonly settle: Duration.DurationInput
  /** Reconnect backoff: first delay and cap. */
  readonly backoffBase: Duration.DurationInput
  readonly backoffCap: Duration.DurationInput
  /** Never delete on the destinations, neither in reconciliation nor live. */
  readonly noDelete: boolean
  /** A coalesced batch of more paths than this is a burst (a `git checkout`): reconcile after it. */
  readonly burstThreshold: number
  readonly safety: SafetyOptions
}

export const defaultSyncOptions: SyncOptions = {
  settle: "25 millis",
  backoffBase: "250 millis",
  backoffCap: "10 seconds",
  noDelete: false,
  burstThreshold: 1000,
  safety: defaultSafety
}

/** Capped exponential backoff with ±20 % jitter: 250 ms, 500 ms, 1 s … 10 s. */
export const reconnectSchedule = (options: SyncOptions = defaultSyncOptions) =>
  Schedule.exponential(options.backoffBase, 2).pipe(
    Schedule.union(Schedule.spaced(options.backoffCap)),
    Schedule.jittered,
    Schedule.delays
  )

// ---- reading the local tree -------------------------------------------------------------------

/**
 * Files up to this size are read with synchronous calls: a few microseconds of blocking instead of
 * five thread-pool round trips, which dominate a big sync of many small files.
 */
const SMALL_FILE_BYTES = 256 * 1024

type Stats = import("node:fs").Stats

/** What a file was seen as (by an lstat, or by the scan): its bytes are sent only if it still is. */
export interface SeenFile {
  readonly size: number
  readonly mtime: number
  /** Permission bits (`& 0o7777`). */
  readonly mode: number
}

export const seenFile = (stats: Stats): SeenFile => ({ size: stats.size, mtime: stats.mtimeMs, mode: stats.mode & 0o7777 })

/**
 * A file's bytes as they are now, if it is still the regular file it was seen as: a change of size,
 * mtime, mode or type before or during the read means "plan it again later". `follow`: the path
 * may be a symbolic link to the file (`followSymLinks`); otherwise a link found there is a change.
 * Classes, not closures: a big sync makes one per file.
 */
export const fileSource = (abs: string, rel: string, seen: SeenFile, follow: boolean): FileSource =>
  seen.size <= SMALL_FILE_BYTES ? new SmallFile(abs, rel, seen, follow) : new LargeFile(abs, rel, seen, follow)

/**
 * Errors that say the path is gone or no longer a regular file: a directory (EISDIR on read), a
 * symbolic link (ELOOP on open with O_NOFOLLOW; EMLINK on FreeBSD, EFTYPE on NetBSD), a fifo or a
 * device (EAGAIN on read; ESPIPE on a read at an offset, as small files are read), a socket (ENXIO on
 * open). The path is planned again.
 */
const NOT_THE_FILE = new Set(["ENOENT", "ENOTDIR", "EISDIR", "ELOOP", "EMLINK", "EFTYPE", "EAGAIN", "ESPIPE", "ENXIO"])

/** O_NONBLOCK: a fifo put where the file was must not block the open (it reads as changed). */
const READ_FLAGS = fsSync.constants.O_RDONLY | fsSync.constants.O_NONBLOCK

abstract class LocalFile {
  readonly size: number
  readonly mode: number
  readonly mtime: number
  protected readonly flags: number
  // The numbers only, not the Stats (and its four Dates): a big sync keeps each file until its ack.
  constructor(protected readonly abs: string, readonly path: string, seen: SeenFile, follow: boolean) {
    this.size = seen.size
    this.mode = seen.mode
    this.mtime = seen.mtime
    this.flags = follow ? READ_FLAGS : READ_FLAGS | fsSync.constants.O_NOFOLLOW
  }
  protected changed(now: Stats) {
    return now.size !== this.size || now.mtimeMs !== this.mtime || (now.mode & 0o7777) !== this.mode || !now.isFile()
  }
  protected unreadable(e: unknown) {
    const code = (e as NodeJS.ErrnoException).code
    return code !== undefined && NOT_THE_FILE.has(code)
      ? new SourceChanged({ path: this.path })
      : new SourceUnreadable({ path: this.path, message: (e as Error).message })
  }
}

class SmallFile extends LocalFile implements FileSource {
  /** The whole file into `target` at `offset`, where `size + 1` bytes are free. */
  readInto(target: Buffer, offset: number): number | SourceChanged | SourceUnreadable {
    let fd: number
    try {
      fd = fsSync.openSync(this.abs, this.flags)
    } catch (e) {
      return this.unreadable(e)
    }
    try {
      // One byte more than expected: a file that grew since the stat is noticed here.
      const bytesRead = fsSync.readSync(fd, target, offset, this.size + 1, 0)
      return bytesRead !== this.size || this.changed(fsSync.fstatSync(fd)) ? new SourceChanged({ path: this.path }) : bytesRead
    } catch (e) {
      return this.unreadable(e)
    } finally {
      fsSync.closeSync(fd)
    }
  }

  read(emit: (chunk: Uint8Array) => Effect.Effect<void, ConnectionLost>) {
    return Effect.suspend((): Effect.Effect<void, ConnectionLost | SourceChanged | SourceUnreadable> => {
      const buffer = Buffer.allocUnsafe(this.size + 1)
      const read = this.readInto(buffer, 0)
      if (typeof read !== "number") return Effect.fail(read)
      return read > 0 ? emit(buffer.subarray(0, read)) : Effect.void
    })
  }
}

class LargeFile extends LocalFile implements FileSource {
  read(emit: (chunk: Uint8Array) => Effect.Effect<void, ConnectionLost>) {
    const { abs, path: rel, size } = this
    return Effect.acquireUseRelease(
      Effect.tryPromise({ try: () => fs.open(abs, this.flags), catch: (e) => this.unreadable(e) }),
      (handle) =>
        Effect.gen(this, function* () {
          const io = <A>(f: () => Promise<A>) => Effect.tryPromise({ try: f, catch: (e) => this.unreadable(e) })
          if (this.changed(yield* io(() => handle.stat()))) return yield* new SourceChanged({ path: rel })
          let offset = 0
          while (offset < size) {
            const buffer = Buffer.allocUnsafe(Math.min(CHUNK_BYTES, size - offset))
            const { bytesRead } = yield* io(() => handle.read(buffer, 0, buffer.byteLength, offset))
            if (bytesRead === 0) return yield* new SourceChanged({ path: rel })
            yield* emit(buffer.subarray(0, bytesRead))
            offset += bytesRead
          }
          if (this.changed(yield* io(() => handle.stat()))) return yield* new SourceChanged({ path: rel })
        }),
      (handle) => Effect.promise(() => handle.close())
    )
  }
}

const lstatOrUndefined = (abs: string) => {
  try {
    return fsSync.lstatSync(abs, { throwIfNoEntry: false })
  } catch {
    return undefined // ENOTDIR: a parent became a file; the path is gone
  }
}

/** The operation that makes the remote path look like the local one now. */
type Plan =
  | { readonly kind: "remove"; readonly path: string }
  | { readonly kind: "mkdir"; readonly path: string; readonly mode: number; readonly mtime: number }
  | { readonly kind: "symlink"; readonly path: string; readonly target: string }
  | { readonly kind: "write"; readonly path: string; readonly source: FileSource }
  | { readonly kind: "skip"; readonly path: string; readonly why: string }

/** Synchronous: a few microseconds per path, where async calls cost a thread-pool round trip each. */
const planNow = (project: ResolvedProject, excludes: Excludes, change: Change): Plan => {
  {
    // The disk decides, not the event: a remove may be stale (reported late, or from an old scan).
    const rel = change.path
    const abs = path.join(project.root, rel)
    const lstat = lstatOrUndefined(abs)
    if (lstat === undefined) return { kind: "remove", path: rel }
    let stats = lstat
    if (lstat.isSymbolicLink()) {
      if (!project.followSymLinks) {
        const target = attempt(() => fsSync.readlinkSync(abs))
        return target === undefined ? { kind: "remove", path: rel } : { kind: "symlink", path: rel, target }
      }
      const target = attempt(() => fsSync.statSync(abs))
      if (target === undefined) return { kind: "skip", path: rel, why: "a broken symbolic link (followSymLinks is on)" }
      stats = target
    }
    if (excludes.isExcluded(rel, stats.isDirectory())) return { kind: "skip", path: rel, why: "excluded" }
    if (stats.isDirectory()) return { kind: "mkdir", path: rel, mode: stats.mode & 0o7777, mtime: stats.mtimeMs }
    if (stats.isFile()) return { kind: "write", path: rel, source: fileSource(abs, rel, seenFile(stats), project.followSymLinks) }
    return { kind: "skip", path: rel, why: "not a regular file, directory or symbolic link" }
  }
}

const attempt = <A>(f: () => A): A | undefined => {
  try {
    return f()
  } catch {
    return undefined
  }
}

const verb: Record<Plan["kind"], string> = { remove: "remove", mkdir: "mkdir", symlink: "symlink", write: "change", skip: "skip" }

// ---- the shared scan ---------------------------------------------------------------------------

/** How old a scan may be and still serve a reconciliation after a (re)connect. */
const SCAN_REUSE_MS = 2_000
/** Times a change the daemon refused for the protocol's reasons is sent again before it counts as failed. */
const MAX_RETRIES = 5
/**
 * Operations sent and not yet answered, beyond which sending waits for the oldest answer. Far more
 * than the credit window holds of files of any useful size: it bounds memory, not throughput.
 */
export const MAX_UNSETTLED = 4096
/**
 * Failed changes named one by one in a batch; the rest are counted by cause. A full disk fails every
 * write of a big sync alike, and 20,000 lines saying so would bury everything else.
 */
export const FAILURES_SHOWN = 10

/**
 * "ENOSPC (no space left on device)" out of a failure's message (the last such part: a path before it
 * may look like one), else the kind of failure.
 */
const causeOf = (e: { readonly code?: string; readonly message: string }) => {
  const errno = [...e.message.matchAll(/\b(E[A-Z0-9]{2,}): ([^,]+)/g)].pop()
  if (errno !== undefined) return `${errno[1]} (${errno[2]})`
  return e.code === "confinement" ? "refused as outside the destination" : e.code ?? e.message
}

/**
 * One local scan serves every destination reconciling at about the same time. Reusing a scan that
 * started before a change is safe while the change is in every worker's dirty set (workers exist
 * before the watcher starts), and what is sent is what is on disk at send time: `planNow` looks again,
 * and a file planned from the scan is sent only if the open file still is what the scan saw. A change
 * already sent has left the dirty set: a worker whose session died asks for a scan started after that.
 */
export interface Scanner {
  /** A scan that started at `notBefore` or later (ms since the epoch), running a new one if needed. */
  readonly scan: (notBefore: number) => Effect.Effect<LocalTree, ScanError>
}

export const makeScanner = (project: ResolvedProject, excludes: Excludes) =>
  Effect.gen(function* () {
    const lock = yield* Effect.makeSemaphore(1)
    let last: { readonly startedAt: number; readonly tree: LocalTree } | undefined
    const scan = (notBefore: number) =>
      lock.withPermits(1)(
        Effect.gen(function* () {
          if (last !== undefined && last.startedAt >= notBefore) return last.tree
          const startedAt = yield* Clock.currentTimeMillis
          const tree = yield* scanLocal(project, excludes)
          last = { startedAt, tree }
          return tree
        })
      )
    return { scan } satisfies Scanner
  })

// ---- one destination ---------------------------------------------------------------------------

/**
 * - `live`: reconcile on every connect, then follow the watcher until interrupted.
 * - `once`: reconcile, send the difference, and return.
 * - `dry-run`: reconcile, print the plan, change nothing.
 */
export type WorkerMode = "live" | "once" | "dry-run"

/** The destination stopped for a reason retrying cannot fix; already logged. */
export class DestinationHalted extends Data.TaggedError("DestinationHalted")<{
  readonly dest: string
  readonly message: string
  /** Halted by the deletion safety check: `--force` (or a confirmation) would let it go on. */
  readonly unsafeDeletion: boolean
}> {}

export interface DestinationWorker {
  readonly dest: ResolvedDestination
  /** Marks paths dirty; never blocks. */
  readonly offer: (changes: ReadonlyArray<Change>) => Effect.Effect<void>
  /** Asks for a reconciliation against a scan started at `notBefore` or later. */
  readonly requestReconcile: (notBefore: number) => Effect.Effect<void>
  /** Connects, reconciles, sends, reconnects — until interrupted (live) or in sync (once). */
  readonly run: Effect.Effect<void, DestinationHalted>
}

const formatBytes = (n: number) =>
  n < 1024 ? `${n} B` : n < 1024 ** 2 ? `${(n / 1024).toFixed(1)} KiB` : n < 1024 ** 3 ? `${(n / 1024 ** 2).toFixed(1)} MiB` : `${(n / 1024 ** 3).toFixed(2)} GiB`

export const makeDestinationWorker = (
  project: ResolvedProject,
  dest: ResolvedDestination,
  excludes: Excludes,
  scanner: Scanner,
  options: SyncOptions = defaultSyncOptions,
  mode: WorkerMode = "live"
) =>
  Effect.gen(function* () {
    const remote = yield* RemoteConnection
    const progress = yield* Progress
    const status = yield* Status
    const show = (state: DestinationState) => status.set(project.name, dest.name, state)
    let dirty = new Map<string, ChangeKind>()
    const wake = yield* Queue.sliding<void>(1)

    /**
     * Files of the last reconciliation's plan as its scan saw them, sent without another lstat (the
     * read checks them against the open file). A path the watcher reported since has none.
     */
    let scanned = new Map<string, SeenFile>()

    const offer = (changes: ReadonlyArray<Change>) =>
      Effect.suspend(() => {
        for (const change of changes) {
          dirty.set(change.path, change.kind)
          scanned.delete(change.path)
        }
        return changes.length > 0 ? Effect.asVoid(wake.offer(undefined)) : Effect.void
      })

    /** Puts back what was taken but not applied, unless a newer change for the path arrived meanwhile. */
    const restore = (unapplied: Map<string, ChangeKind>) =>
      Effect.suspend(() => {
        for (const [p, kind] of unapplied) if (!dirty.has(p)) dirty.set(p, kind)
        return unapplied.size > 0 ? Effect.asVoid(wake.offer(undefined)) : Effect.void
      })

    /** When set, a reconciliation is due, against a scan started at this time or later. */
    let reconcileFrom: number | undefined
    const requestReconcile = (notBefore: number) =>
      Effect.suspend(() => {
        reconcileFrom = Math.max(reconcileFrom ?? 0, notBefore)
        return Effect.asVoid(wake.offer(undefined))
      })

    /** The running reconciliation, and what it has done so far (reported once the queue drains). */
    let reconciling:
      | { readonly startedAt: number; readonly bar: Bar; sent: number; bytes: number; removed: number; failed: number }
      | undefined

    const rootIsThere = Effect.promise(() => fs.stat(project.root).then((s) => s.isDirectory(), () => false))

    /** Set when a file changed while being read: it stays dirty and is read again after `settle`. */
    let settling = false
    /** Refusals of each path in a row, and the changes that could not be applied (a `once` run fails with them). */
    const retries = new Map<string, number>()
    let failures = 0
    /** Paths whose last change failed: not mirrored until one succeeds (or a reconciliation plans them again). */
    const failedPaths = new Set<string>()
    /** `p` is handled: neither it nor, if it was a directory now removed, anything below it has failed. */
    const handled = (p: string, removed: boolean) => {
      failedPaths.delete(p)
      if (!removed || failedPaths.size === 0) return
      const below = p + "/"
      for (const f of failedPaths) if (f.startsWith(below)) failedPaths.delete(f)
    }
    /** In sync, as far as the queue goes: unless some change failed. */
    const drained = (): DestinationState => (failedPaths.size === 0 ? { _tag: "inSync" } : { _tag: "failing", failed: failedPaths.size })

    const reconcile = (session: Session, notBefore: number) =>
      Effect.gen(function* () {
        // One cut short (the connection lost) is not summed up; its successor, if it has work, is.
        reconciling = undefined
        // What failed before differs from the destination: this plan has it again.
        failedPaths.clear()
        const startedAt = yield* Clock.currentTimeMillis
        yield* show({ _tag: "reconciling" })
        // The daemon walks its tree while we walk ours.
        const [local, manifest] = yield* Effect.all([scanner.scan(notBefore), session.manifest], { concurrency: 2 })
        const plan = diff(local, manifest, excludes, { noDelete: options.noDelete })
        if (mode === "dry-run") {
          const lines = [
            `plan: ${plan.upserts.length} to send (${formatBytes(plan.bytes)}), ${plan.removes.length} to delete${options.noDelete ? " (--no-delete)" : ""}`,
            ...[...plan.upserts].sort().map((p) => `  send   ${p}`),
            ...[...plan.removes].sort().map((p) => `  delete ${p}`)
          ]
          yield* Effect.log(lines.join("\n"))
          return
        }
        yield* checkSafety(local, plan, deletedCount(plan, manifest), options.safety)
        // A path already dirty carries a newer word from the watcher than the scan.
        for (const p of plan.removes) if (!dirty.has(p)) dirty.set(p, "remove")
        scanned = new Map()
        for (const p of plan.upserts) {
          if (dirty.has(p)) continue
          dirty.set(p, "upsert")
          const entry = local.get(p)
          if (entry?.type === "file") scanned.set(p, entry)
        }
        if (plan.upserts.length + plan.removes.length === 0 && dirty.size === 0) {
          yield* show({ _tag: "inSync" })
          yield* Effect.log(`in sync (${local.size} entries checked in ${(yield* Clock.currentTimeMillis) - startedAt} ms)`)
          return
        }
        yield* Effect.log(`reconciling: ${plan.upserts.length} to send (${formatBytes(plan.bytes)}), ${plan.removes.length} to delete`)
        const bar = yield* progress.start(`${project.name} → ${dest.name}`, plan.upserts.length + plan.removes.length, plan.bytes)
        reconciling = { startedAt, bar, sent: 0, bytes: 0, removed: 0, failed: 0 }
      })

    /** A file of the reconciliation's plan, as its scan saw it: 20,000 lstats fewer in an initial sync. */
    const planScanned = (change: Change): Plan | undefined => {
      if (change.kind !== "upsert") return undefined
      const seen = scanned.get(change.path)
      if (seen === undefined) return undefined
      scanned.delete(change.path)
      return { kind: "write", path: change.path, source: fileSource(path.join(project.root, change.path), change.path, seen, project.followSymLinks) }
    }

    /** A small file goes out in a batch, read into the very frame that carries it; anything else is streamed. */
    const writeFile = (session: Session, source: FileSource) =>
      source.readInto !== undefined && session.writeSmall !== undefined ? session.writeSmall(source) : session.write(source)

    /** Sends one batch, pipelined; returns when every operation is acknowledged. */
    const apply = (session: Session, batch: Map<string, ChangeKind>) =>
      Effect.gen(function* () {
        const unapplied = new Map(batch)
        // Parents before children; a removed directory takes its contents with it. Plain loops: a big
        // sync's batch is tens of thousands of paths, all sorted before the first is sent.
        const removed = new Set<string>()
        for (const [p, kind] of batch) if (kind === "remove") removed.add(p)
        const coveredByRemoval = (p: string) => {
          for (let i = p.lastIndexOf("/"); i > 0; i = p.lastIndexOf("/", i - 1)) if (removed.has(p.slice(0, i))) return true
          return false
        }
        let ordered: Array<Change & { readonly depth: number }> = []
        for (const [p, kind] of batch) {
          if (kind === "remove" && coveredByRemoval(p)) {
            unapplied.delete(p)
            continue
          }
          let depth = 0
          for (let i = p.indexOf("/"); i >= 0; i = p.indexOf("/", i + 1)) depth++
          ordered.push({ path: p, kind, depth })
        }
        ordered.sort((a, b) => (a.kind !== b.kind ? (a.kind === "remove" ? -1 : 1) : a.depth - b.depth || (a.path < b.path ? -1 : 1)))

        // Safety: removals while the source root is gone are the root vanishing, not the user deleting.
        if (removed.size > 0 && !(yield* rootIsThere)) {
          yield* Effect.logError(`${project.root} is missing: not deleting anything on the destination`)
          for (const r of removed) unapplied.delete(r)
          ordered = ordered.filter((c) => c.kind !== "remove")
        }

        let failed = 0
        /** Failures past the first `FAILURES_SHOWN`, by cause. */
        const unshown = new Map<string, number>()
        /** A change that could not be made, on either side: the destination is not a mirror until it is. */
        const failure = (path: string, line: string, cause: string) =>
          Effect.suspend(() => {
            failures++
            failedPaths.add(path)
            if (reconciling !== undefined) reconciling.failed++
            if (++failed <= FAILURES_SHOWN) return Effect.logError(line)
            unshown.set(cause, (unshown.get(cause) ?? 0) + 1)
            return Effect.void
          })
        // Made once, not per path: a big sync sends tens of thousands.
        const unsent = {
          SourceChanged: () => Effect.sync(() => (settling = true)).pipe(Effect.as("settling" as const)),
          SourceUnreadable: (e: SourceUnreadable) =>
            Effect.as(failure(e.path, `cannot read ${e.path}: ${e.message}`, `unreadable here: ${causeOf(e)}`), undefined)
        }
        // Sent and not yet settled, oldest first. Settled in order as their answers come, while the sending
        // goes on: a big sync's tens of thousands of operations would otherwise all stay in memory until
        // the last is sent, and its progress bar would stand still until then.
        const inFlight: Array<{ readonly plan: Plan; readonly ack: Ack; readonly kind: ChangeKind } | undefined> = []
        let head = 0
        let succeeded = 0
        let shown = 0
        // Lines 21 to 25 wait for the end: shown if the batch had no more, else summed up.
        const held: Array<string> = []
        const bar = reconciling?.bar
        // A drawn progress bar stands in for the per-file lines (they would tear it).
        const quiet = bar?.drawn === true
        const settleOldest = Effect.gen(function* () {
          const { ack, kind, plan } = inFlight[head]!
          inFlight[head++] = undefined
          if (head === inFlight.length) inFlight.length = head = 0
          const result = yield* Effect.either(ack.wait)
          if (result._tag === "Left" && result.left._tag === "ConnectionLost") return yield* result.left
          // A refusal of the protocol's kind (the daemon too busy, a write it gave up) is tried again,
          // a few times, after a pause; a filesystem or confinement error is reported and counted.
          if (result._tag === "Left" && result.left._tag === "OperationFailed" && (result.left.code === "protocol" || result.left.code === "aborted")) {
            const tries = (retries.get(plan.path) ?? 0) + 1
            retries.set(plan.path, tries)
            if (tries <= MAX_RETRIES) {
              settling = true
              yield* Effect.logWarning(`${verb[plan.kind]} ${plan.path} refused (${result.left.message}); trying again`)
              return
            }
          }
          if (unapplied.get(plan.path) === kind) unapplied.delete(plan.path)
          retries.delete(plan.path)
          if (bar !== undefined) yield* bar.advance(plan.kind === "write" ? plan.source.size : 0)
          if (result._tag === "Left") return yield* failure(plan.path, `${verb[plan.kind]} ${plan.path} failed: ${result.left.message}`, causeOf(result.left))
          succeeded++
          handled(plan.path, plan.kind === "remove")
          if (reconciling !== undefined) {
            if (plan.kind === "remove") reconciling.removed++
            else reconciling.sent++
            if (plan.kind === "write") reconciling.bytes += plan.source.size
          }
          if (!quiet && shown < 20) {
            shown++
            yield* Effect.log(`> ${verb[plan.kind]} ${plan.path}`)
          } else if (!quiet && held.length < 5) {
            held.push(`> ${verb[plan.kind]} ${plan.path}`)
          }
        })
        yield* Effect.gen(function* () {
          for (const change of ordered) {
            // Synchronous, in the generator: an effect per path would cost more than the lstat it wraps.
            const plan = planScanned(change) ?? planNow(project, excludes, change)
            if (plan.kind === "skip" || (plan.kind === "remove" && options.noDelete)) {
              unapplied.delete(change.path)
              handled(change.path, plan.kind === "remove")
              if (plan.kind === "skip" && plan.why !== "excluded") yield* Effect.logWarning(`skipped ${plan.path}: ${plan.why}`)
              continue
            }
            const sent = yield* (
              plan.kind === "write"
                ? writeFile(session, plan.source)
                : session.send(
                    plan.kind === "remove"
                      ? { _tag: "Remove", path: plan.path }
                      : plan.kind === "mkdir"
                        ? { _tag: "Mkdir", path: plan.path, mode: plan.mode, mtime: plan.mtime }
                        : { _tag: "Symlink", path: plan.path, target: plan.target }
                  )
            ).pipe(Effect.catchTags(unsent))
            if (sent === "settling") continue
            if (sent === undefined) {
              unapplied.delete(change.path)
              continue
            }
            inFlight.push({ plan, ack: sent, kind: change.kind })
            while (head < inFlight.length && (inFlight[head]!.ack.done() || inFlight.length - head > MAX_UNSETTLED)) yield* settleOldest
          }
          while (head < inFlight.length) yield* settleOldest
          if (succeeded <= 25) for (const line of held) yield* Effect.log(line)
          else if (!quiet) yield* Effect.log(`> … and ${succeeded - shown} more`)
          if (unshown.size > 0) {
            const causes = [...unshown].sort((a, b) => b[1] - a[1]).map(([cause, n]) => `${cause} ×${n}`).join(", ")
            yield* Effect.logError(`… and ${failed - FAILURES_SHOWN} more failed: ${causes}`)
          }
        }).pipe(Effect.onExit(() => restore(unapplied)))
      })

    /** Returns when in sync in `once`/`dry-run` modes; never in `live`. */
    const pump = (session: Session) =>
      Effect.gen(function* () {
        for (;;) {
          if (reconcileFrom !== undefined) {
            const from = reconcileFrom
            reconcileFrom = undefined
            yield* reconcile(session, from)
            if (mode === "dry-run") return
          }
          if (dirty.size === 0) {
            if (mode !== "live") return
            yield* wake.take
            continue
          }
          const batch = dirty
          dirty = new Map()
          yield* show({ _tag: "syncing", files: batch.size })
          yield* apply(session, batch)
          if (dirty.size === 0 && reconcileFrom === undefined) yield* show(drained())
          if (reconciling !== undefined && dirty.size === 0 && reconcileFrom === undefined) {
            const r = reconciling
            reconciling = undefined
            const seconds = ((yield* Clock.currentTimeMillis) - r.startedAt) / 1000
            const done = `sent ${r.sent} (${formatBytes(r.bytes)}), deleted ${r.removed}, in ${seconds.toFixed(2)} s`
            if (r.failed === 0) yield* Effect.log(`in sync: ${done}`)
            else yield* Effect.logError(`out of sync: ${r.failed} change(s) failed (see above); ${done}`)
          }
          if (settling) {
            settling = false
            yield* Effect.sleep(options.settle)
          }
        }
      })

    let lastError = ""
    let lastRetried = false
    const connect = remote.open(dest, project).pipe(
      Effect.tapError((e: ConnectError) =>
        Effect.sync(() => {
          lastError = e.message
          lastRetried = e.retryable && mode === "live"
        })
      ),
      Effect.retry({
        while: (e: ConnectError) => e.retryable && mode === "live",
        schedule: reconnectSchedule(options).pipe(
          // The schedule steps once more for an error `while` then stops: announce retries only.
          Schedule.tapOutput((delay) =>
            lastRetried
              ? Effect.zipRight(
                  show({ _tag: "offline", retryInMs: Duration.toMillis(delay) }),
                  Effect.logWarning(`offline (${lastError}); retrying in ${Duration.format(Duration.millis(Math.round(Duration.toMillis(delay))))}`)
                )
              : Effect.void
          )
        )
      })
    )

    const halt = (message: string, unsafeDeletion = false) =>
      Effect.zipRight(
        Effect.zipRight(show({ _tag: "halted" }), Effect.logError(`${message}; this destination is halted`)),
        Effect.fail(new DestinationHalted({ dest: dest.name, message, unsafeDeletion }))
      )

    const run: Effect.Effect<void, DestinationHalted> = Effect.gen(function* () {
      /** When the last session died: changes sent before then may be missing from any earlier scan. */
      let lostAt = 0
      for (;;) {
        yield* show({ _tag: "connecting" })
        const outcome = yield* Effect.scoped(
          Effect.gen(function* () {
            const session = yield* connect
            yield* Effect.log(`connected to ${session.root}`)
            // Whatever changed while we were away — or before we started — is found by comparing. A
            // one-off run has no watcher to catch up with: any scan of its own scanner serves, however slow
            // the connect was. A live one may reuse a recent scan, but none from before its last session
            // died: the changes that session sent are on the destination, and gone from the dirty set, so
            // a scan without them would plan to delete them (and, were they most of it, halt).
            const now = yield* Clock.currentTimeMillis
            yield* requestReconcile(mode === "live" ? Math.max(now - SCAN_REUSE_MS, lostAt) : 0)
            return yield* Effect.raceFirst(pump(session), Effect.flatMap(session.closed, Effect.fail))
          })
        ).pipe(Effect.either)
        if (outcome._tag === "Right") {
          if (failures > 0) return yield* halt(`${failures} change(s) could not be applied (see above)`)
          return
        }
        const error = outcome.left
        switch (error._tag) {
          case "ConnectError":
            return yield* halt(error.message)
          case "ScanError":
            return yield* halt(`cannot read ${error.root}: ${error.message}`)
          case "UnsafeDeletion":
            return yield* halt(error.message, true)
          case "ConnectionLost":
            if (mode !== "live") return yield* halt(`connection lost: ${error.message}`)
            lostAt = yield* Clock.currentTimeMillis
            yield* Effect.logWarning(`connection lost (${error.message}); reconnecting`)
        }
      }
    }).pipe(
      Effect.ensuring(status.remove(project.name, dest.name)),
      Effect.annotateLogs({ dest: dest.name })
    )

    return { dest, offer, requestReconcile, run } satisfies DestinationWorker
  })

// ---- the project --------------------------------------------------------------------------------

/**
 * Starts the first scan at once, while the destinations connect: their reconciliations reuse it (it
 * started after the watch, if any, was in place). A failure is theirs to meet and report when they scan.
 */
const prefetch = (scanner: Scanner) =>
  Effect.flatMap(Clock.currentTimeMillis, (now) => Effect.forkScoped(Effect.ignore(scanner.scan(now))))

/** Mirrors one project onto all its destinations until interrupted. */
export const syncProject = (project: ResolvedProject, options: SyncOptions = defaultSyncOptions) =>
  Effect.scoped(
    Effect.gen(function* () {
      const watcher = yield* Watcher
      const excludes = yield* makeExcludes({ root: project.root, excludes: project.excludes, excludesFile: project.excludesFile })
      const scanner = yield* makeScanner(project, excludes)
      const workers = yield* Effect.forEach(project.destinations, (dest) => makeDestinationWorker(project, dest, excludes, scanner, options))
      // Watch before the first scan, so nothing that happens during it is missed.
      const handle = yield* watcher.start({ root: project.root, excludes, followSymLinks: project.followSymLinks })
      yield* prefetch(scanner)
      for (const worker of workers) yield* Effect.forkScoped(Effect.ignore(worker.run))
      yield* Effect.log(`watching ${project.root} → ${project.destinations.map((d) => d.name).join(", ")}`)
      yield* coalesce(handle.events).pipe(
        Stream.runForEach((batch) =>
          Effect.gen(function* () {
            yield* Effect.forEach(workers, (worker) => worker.offer(batch), { discard: true })
            // A burst this large may have overflowed the watcher: compare the whole tree after it.
            if (batch.length > options.burstThreshold) {
              const now = yield* Clock.currentTimeMillis
              yield* Effect.forEach(workers, (worker) => worker.requestReconcile(now), { discard: true })
            }
          })
        )
      )
    })
  ).pipe(Effect.annotateLogs({ project: project.name }))

/**
 * `sicksync once`: one reconciliation of every destination, concurrently, then return. Fails with
 * the first halted destination (every halt is logged).
 */
export const reconcileOnce = (project: ResolvedProject, options: SyncOptions = defaultSyncOptions, dryRun = false) =>
  Effect.gen(function* () {
    const excludes = yield* makeExcludes({ root: project.root, excludes: project.excludes, excludesFile: project.excludesFile })
    const scanner = yield* makeScanner(project, excludes)
    yield* prefetch(scanner)
    const workers = yield* Effect.forEach(project.destinations, (dest) =>
      makeDestinationWorker(project, dest, excludes, scanner, options, dryRun ? "dry-run" : "once")
    )
    const results = yield* Effect.forEach(workers, (worker) => Effect.either(worker.run), { concurrency: "unbounded" })
    const failed = results.find((r) => r._tag === "Left")
    if (failed !== undefined && failed._tag === "Left") return yield* failed.left
  }).pipe(Effect.scoped, Effect.annotateLogs({ project: project.name }))

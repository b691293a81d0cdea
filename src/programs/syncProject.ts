/**
 * syncProject: watcher → coalescer → one worker per destination.
 *
 * Each destination keeps its own dirty set (path → latest change) and a wake-up token, so a slow
 * or offline destination never delays the others and nothing queued for it is lost: changes made
 * while it is offline fold into the set (latest wins) and are sent when it is back.
 */
import { Duration, Effect, Queue, Schedule, Stream } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import type { ResolvedDestination, ResolvedProject } from "../schemas/ConfigFile.js"
import type { Change, ChangeKind } from "../schemas/FileEvent.js"
import { CHUNK_BYTES } from "../schemas/Protocol.js"
import type { ConnectError } from "../services/DaemonLocator.js"
import { type Excludes, makeExcludes } from "../services/Excludes.js"
import {
  type Ack,
  type FileSource,
  RemoteConnection,
  type Session,
  SourceChanged,
  SourceUnreadable
} from "../services/RemoteConnection.js"
import { Watcher } from "../services/Watcher.js"
import { coalesce } from "./coalesce.js"

export interface SyncOptions {
  /** Re-read a file this long after it was seen changing mid-read. */
  readonly settle: Duration.DurationInput
  /** Reconnect backoff: first delay and cap. */
  readonly backoffBase: Duration.DurationInput
  readonly backoffCap: Duration.DurationInput
}

export const defaultSyncOptions: SyncOptions = { settle: "25 millis", backoffBase: "250 millis", backoffCap: "10 seconds" }

/** Capped exponential backoff with ±20 % jitter: 250 ms, 500 ms, 1 s … 10 s. */
export const reconnectSchedule = (options: SyncOptions = defaultSyncOptions) =>
  Schedule.exponential(options.backoffBase, 2).pipe(
    Schedule.union(Schedule.spaced(options.backoffCap)),
    Schedule.jittered,
    Schedule.delays
  )

// ---- reading the local tree -------------------------------------------------------------------

/** A file's bytes as they are now; a size or mtime change during the read means "read it again later". */
export const fileSource = (abs: string, rel: string, stats: import("node:fs").Stats): FileSource => ({
  path: rel,
  size: stats.size,
  mode: stats.mode & 0o7777,
  mtime: stats.mtimeMs,
  read: (emit) =>
    Effect.acquireUseRelease(
      Effect.tryPromise({
        try: () => fs.open(abs, "r"),
        catch: (e) =>
          (e as NodeJS.ErrnoException).code === "ENOENT"
            ? new SourceChanged({ path: rel })
            : new SourceUnreadable({ path: rel, message: (e as Error).message })
      }),
      (handle) =>
        Effect.gen(function* () {
          const io = <A>(f: () => Promise<A>) =>
            Effect.tryPromise({ try: f, catch: (e) => new SourceUnreadable({ path: rel, message: (e as Error).message }) })
          const changed = (s: import("node:fs").Stats) => s.size !== stats.size || s.mtimeMs !== stats.mtimeMs
          if (changed(yield* io(() => handle.stat()))) return yield* new SourceChanged({ path: rel })
          let offset = 0
          while (offset < stats.size) {
            const buffer = Buffer.allocUnsafe(Math.min(CHUNK_BYTES, stats.size - offset))
            const { bytesRead } = yield* io(() => handle.read(buffer, 0, buffer.byteLength, offset))
            if (bytesRead === 0) return yield* new SourceChanged({ path: rel })
            yield* emit(buffer.subarray(0, bytesRead))
            offset += bytesRead
          }
          if (changed(yield* io(() => handle.stat()))) return yield* new SourceChanged({ path: rel })
        }),
      (handle) => Effect.promise(() => handle.close())
    )
})

/** The operation that makes the remote path look like the local one now. */
type Plan =
  | { readonly kind: "remove"; readonly path: string }
  | { readonly kind: "mkdir"; readonly path: string; readonly mode: number; readonly mtime: number }
  | { readonly kind: "symlink"; readonly path: string; readonly target: string }
  | { readonly kind: "write"; readonly path: string; readonly source: FileSource }
  | { readonly kind: "skip"; readonly path: string; readonly why: string }

export const planFor = (project: ResolvedProject, excludes: Excludes, change: Change) =>
  Effect.promise(async (): Promise<Plan> => {
    const rel = change.path
    if (change.kind === "remove") return { kind: "remove", path: rel }
    const abs = path.join(project.root, rel)
    const lstat = await fs.lstat(abs).catch(() => undefined)
    if (lstat === undefined) return { kind: "remove", path: rel }
    let stats = lstat
    if (lstat.isSymbolicLink()) {
      if (!project.followSymLinks) return { kind: "symlink", path: rel, target: await fs.readlink(abs) }
      const target = await fs.stat(abs).catch(() => undefined)
      if (target === undefined) return { kind: "skip", path: rel, why: "a broken symbolic link (followSymLinks is on)" }
      stats = target
    }
    if (excludes.isExcluded(rel, stats.isDirectory())) return { kind: "skip", path: rel, why: "excluded" }
    if (stats.isDirectory()) return { kind: "mkdir", path: rel, mode: stats.mode & 0o7777, mtime: stats.mtimeMs }
    if (stats.isFile()) return { kind: "write", path: rel, source: fileSource(abs, rel, stats) }
    return { kind: "skip", path: rel, why: "not a regular file, directory or symbolic link" }
  })

const verb: Record<Plan["kind"], string> = { remove: "remove", mkdir: "mkdir", symlink: "symlink", write: "change", skip: "skip" }

// ---- one destination ---------------------------------------------------------------------------

export interface DestinationWorker {
  readonly dest: ResolvedDestination
  /** Marks paths dirty; never blocks. */
  readonly offer: (changes: ReadonlyArray<Change>) => Effect.Effect<void>
  /** Connects, sends, reconnects — until interrupted, or until the destination refuses for good. */
  readonly run: Effect.Effect<void>
}

export const makeDestinationWorker = (
  project: ResolvedProject,
  dest: ResolvedDestination,
  excludes: Excludes,
  options: SyncOptions = defaultSyncOptions
) =>
  Effect.gen(function* () {
    const remote = yield* RemoteConnection
    let dirty = new Map<string, ChangeKind>()
    const wake = yield* Queue.sliding<void>(1)

    const offer = (changes: ReadonlyArray<Change>) =>
      Effect.suspend(() => {
        for (const change of changes) dirty.set(change.path, change.kind)
        return changes.length > 0 ? Effect.asVoid(wake.offer(undefined)) : Effect.void
      })

    /** Puts back what was taken but not applied, unless a newer change for the path arrived meanwhile. */
    const restore = (unapplied: Map<string, ChangeKind>) =>
      Effect.suspend(() => {
        for (const [p, kind] of unapplied) if (!dirty.has(p)) dirty.set(p, kind)
        return unapplied.size > 0 ? Effect.asVoid(wake.offer(undefined)) : Effect.void
      })

    const rootIsThere = Effect.promise(() => fs.stat(project.root).then((s) => s.isDirectory(), () => false))

    /** Set when a file changed while being read: it stays dirty and is read again after `settle`. */
    let settling = false

    /** Sends one batch, pipelined; returns when every operation is acknowledged. */
    const apply = (session: Session, batch: Map<string, ChangeKind>) =>
      Effect.gen(function* () {
        const unapplied = new Map(batch)
        const changes: Array<Change> = [...batch].map(([p, kind]) => ({ path: p, kind }))
        // Parents before children; a removed directory takes its contents with it.
        const removed = changes.filter((c) => c.kind === "remove").map((c) => c.path)
        const coveredByRemoval = (p: string) => removed.some((r) => r !== p && p.startsWith(`${r}/`))
        const ordered = changes
          .filter((c) => !(c.kind === "remove" && coveredByRemoval(c.path)))
          .sort((a, b) =>
            a.kind !== b.kind ? (a.kind === "remove" ? -1 : 1) : a.path.split("/").length - b.path.split("/").length || (a.path < b.path ? -1 : 1)
          )
        for (const c of changes) if (c.kind === "remove" && coveredByRemoval(c.path)) unapplied.delete(c.path)

        // Safety: removals while the source root is gone are the root vanishing, not the user deleting.
        if (removed.length > 0 && !(yield* rootIsThere)) {
          yield* Effect.logError(`${project.root} is missing: not deleting anything on the destination`)
          for (const r of removed) unapplied.delete(r)
          ordered.splice(0, ordered.length, ...ordered.filter((c) => c.kind !== "remove"))
        }

        const acks: Array<{ readonly plan: Plan; readonly ack: Ack; readonly kind: ChangeKind }> = []
        yield* Effect.gen(function* () {
          for (const change of ordered) {
            const plan = yield* planFor(project, excludes, change)
            if (plan.kind === "skip") {
              unapplied.delete(change.path)
              if (plan.why !== "excluded") yield* Effect.logWarning(`skipped ${plan.path}: ${plan.why}`)
              continue
            }
            const sent = yield* (
              plan.kind === "write"
                ? session.write(plan.source)
                : session.send(
                    plan.kind === "remove"
                      ? { _tag: "Remove", path: plan.path }
                      : plan.kind === "mkdir"
                        ? { _tag: "Mkdir", path: plan.path, mode: plan.mode, mtime: plan.mtime }
                        : { _tag: "Symlink", path: plan.path, target: plan.target }
                  )
            ).pipe(
              Effect.catchTags({
                SourceChanged: () => Effect.sync(() => (settling = true)).pipe(Effect.as("settling" as const)),
                SourceUnreadable: (e) => Effect.as(Effect.logError(`cannot read ${e.path}: ${e.message}`), undefined)
              })
            )
            if (sent === "settling") continue
            if (sent === undefined) {
              unapplied.delete(change.path)
              continue
            }
            acks.push({ plan, ack: sent, kind: change.kind })
          }
          let shown = 0
          for (const { ack, kind, plan } of acks) {
            const result = yield* Effect.either(ack)
            if (result._tag === "Left" && result.left._tag === "ConnectionLost") return yield* result.left
            if (unapplied.get(plan.path) === kind) unapplied.delete(plan.path)
            if (result._tag === "Left") {
              yield* Effect.logError(`${verb[plan.kind]} ${plan.path} failed: ${result.left.message}`)
            } else if (shown < 20 || acks.length <= 25) {
              shown++
              yield* Effect.log(`> ${verb[plan.kind]} ${plan.path}`)
            }
          }
          if (acks.length > 25) yield* Effect.log(`> … and ${acks.length - shown} more`)
        }).pipe(Effect.onExit(() => restore(unapplied)))
      })

    const pump = (session: Session) =>
      Effect.gen(function* () {
        for (;;) {
          if (dirty.size === 0) yield* wake.take
          if (dirty.size === 0) continue
          const batch = dirty
          dirty = new Map()
          yield* apply(session, batch)
          if (settling) {
            settling = false
            yield* Effect.sleep(options.settle)
          }
        }
      })

    let lastError = ""
    const connect = remote.open(dest, project).pipe(
      Effect.tapError((e: ConnectError) => Effect.sync(() => (lastError = e.message))),
      Effect.retry({
        while: (e: ConnectError) => e.retryable,
        schedule: reconnectSchedule(options).pipe(
          Schedule.tapOutput((delay) =>
            Effect.logWarning(`offline (${lastError}); retrying in ${Duration.format(Duration.millis(Math.round(Duration.toMillis(delay))))}`)
          )
        )
      })
    )

    const run: Effect.Effect<void> = Effect.gen(function* () {
      for (;;) {
        const outcome = yield* Effect.scoped(
          Effect.gen(function* () {
            const session = yield* connect
            yield* Effect.log(`connected to ${session.welcome.root}`)
            return yield* Effect.raceFirst(pump(session), Effect.flatMap(session.closed, Effect.fail))
          })
        ).pipe(Effect.either)
        if (outcome._tag === "Right") return
        const error = outcome.left
        if (error._tag === "ConnectError") {
          yield* Effect.logError(`${error.message}; this destination is halted`)
          return
        }
        yield* Effect.logWarning(`connection lost (${error.message}); reconnecting`)
      }
    }).pipe(Effect.annotateLogs({ dest: dest.name }))

    return { dest, offer, run } satisfies DestinationWorker
  })

// ---- the project --------------------------------------------------------------------------------

/** Mirrors one project onto all its destinations until interrupted. */
export const syncProject = (project: ResolvedProject, options: SyncOptions = defaultSyncOptions) =>
  Effect.scoped(
    Effect.gen(function* () {
      const watcher = yield* Watcher
      const excludes = yield* makeExcludes({ root: project.root, excludes: project.excludes, excludesFile: project.excludesFile })
      const workers = yield* Effect.forEach(project.destinations, (dest) => makeDestinationWorker(project, dest, excludes, options))
      for (const worker of workers) yield* Effect.forkScoped(worker.run)
      const handle = yield* watcher.start({ root: project.root, excludes, followSymLinks: project.followSymLinks })
      yield* Effect.log(`watching ${project.root} → ${project.destinations.map((d) => d.name).join(", ")}`)
      yield* coalesce(handle.events).pipe(
        Stream.runForEach((batch) => Effect.forEach(workers, (worker) => worker.offer(batch), { discard: true }))
      )
    })
  ).pipe(Effect.annotateLogs({ project: project.name }))

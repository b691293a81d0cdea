/**
 * Supervisor: every project of a run as its own fiber in one process (DESIGN §2). A project that
 * stops with an error is logged with its name and restarted with capped backoff while the others
 * keep syncing; an edit of its config file restarts that project alone with the new settings, and
 * a broken edit keeps the last good config running.
 */
import { Context, Duration, Effect, FiberMap, Layer, Schedule, Stream } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { defaultSyncOptions, syncProject, type SyncOptions } from "../programs/syncProject.js"
import type { ResolvedProject } from "../schemas/ConfigFile.js"
import { SyncConfig } from "./Config.js"
import type { Progress } from "./Progress.js"
import type { RemoteConnection } from "./RemoteConnection.js"
import type { Status } from "./Status.js"
import type { Watcher } from "./Watcher.js"

export interface SuperviseOptions extends SyncOptions {
  /** Restart backoff: first delay and cap. */
  readonly restartBase: Duration.DurationInput
  readonly restartCap: Duration.DurationInput
  /** How long a config file must be quiet before it is read again (editors write in steps). */
  readonly reloadQuiet: Duration.DurationInput
}

export const defaultSuperviseOptions: SuperviseOptions = {
  ...defaultSyncOptions,
  restartBase: "1 second",
  restartCap: "1 minute",
  reloadQuiet: "200 millis"
}

export class Supervisor extends Context.Tag("sicksync/Supervisor")<
  Supervisor,
  {
    /** Runs the projects until interrupted. */
    readonly run: (projects: ReadonlyArray<ResolvedProject>, options?: Partial<SuperviseOptions>) => Effect.Effect<void>
  }
>() {}

/** A table of the projects and their destinations, for the start of a run. */
export const describe = (projects: ReadonlyArray<ResolvedProject>): string => {
  const rows = projects.flatMap((p) =>
    p.destinations.map((d) => [p.name, d.name, d.transport === "local" ? "local" : `${d.username ? `${d.username}@` : ""}${d.hostname}`, d.destinationLocation])
  )
  const header = ["PROJECT", "DESTINATION", "HOST", "PATH"]
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)))
  return [header, ...rows].map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd()).join("\n")
}

/**
 * Changes of one file, as a stream of ticks (its directory is watched: editors replace files). A
 * watch dies with its directory; the directory is looked at every second and, once it is back (a
 * project root removed and restored), watched anew, with a tick for the file found there.
 */
const fileChanges = (file: string) =>
  Stream.async<void>((emit) => {
    const dir = path.dirname(file)
    const name = path.basename(file)
    let watcher: fs.FSWatcher | undefined
    /** dev:ino of the watched directory; undefined while nothing is watched. */
    let watched: string | undefined
    const identity = () => {
      const st = fs.statSync(dir, { throwIfNoEntry: false })
      return st?.isDirectory() ? `${st.dev}:${st.ino}` : undefined
    }
    const unwatch = () => {
      watcher?.close()
      watcher = undefined
      watched = undefined
    }
    const watch = () => {
      unwatch()
      const now = identity()
      if (now === undefined) return
      try {
        watcher = fs.watch(dir, (_event, changed) => {
          if (changed === null || changed === name) void emit.single(undefined)
          // Maybe the directory itself, removed or moved away: this watch would see nothing more.
          // Dropped either way; the next look watches it again (and ticks) if it is still there.
          if (changed === path.basename(dir)) unwatch()
        })
        watcher.on("error", unwatch)
        watched = now
      } catch {
        unwatch()
      }
    }
    watch()
    const timer = setInterval(() => {
      const now = identity()
      if (now === watched) return
      watch()
      if (now !== undefined) void emit.single(undefined)
    }, 1000)
    return Effect.sync(() => {
      clearInterval(timer)
      unwatch()
    })
  })

export const make = Effect.gen(function* () {
  const config = yield* SyncConfig
  const context = yield* Effect.context<RemoteConnection | Watcher | Progress | Status>()

  const run = (projects: ReadonlyArray<ResolvedProject>, overrides: Partial<SuperviseOptions> = {}) =>
    Effect.scoped(
      Effect.gen(function* () {
        const options = { ...defaultSuperviseOptions, ...overrides }
        const running = yield* FiberMap.make<string>()

        const restartSchedule = Schedule.exponential(options.restartBase, 2).pipe(
          Schedule.union(Schedule.spaced(options.restartCap)),
          Schedule.jittered
        )
        const supervised = (project: ResolvedProject) => {
          let lastError = ""
          return syncProject(project, options).pipe(
            Effect.tapError((e) => Effect.sync(() => (lastError = e.message))),
            Effect.retry(
              restartSchedule.pipe(
                Schedule.delays,
                Schedule.tapOutput((delay) =>
                  Effect.logError(`stopped: ${lastError}; restarting in ${Duration.format(Duration.millis(Math.round(Duration.toMillis(delay))))}`)
                )
              )
            ),
            Effect.annotateLogs({ project: project.name }),
            Effect.provide(context)
          )
        }

        // A legacy file holds several projects: its name tells them apart.
        const keyOf = (project: ResolvedProject) => `${project.configFile}\0${project.name}`

        const reloads = (project: ResolvedProject) =>
          fileChanges(project.configFile).pipe(
            Stream.debounce(options.reloadQuiet),
            Stream.runForEach(() =>
              config.reload(project).pipe(
                Effect.flatMap((next) =>
                  JSON.stringify(next) === JSON.stringify(project)
                    ? Effect.void
                    : Effect.zipRight(
                        Effect.log(`${project.configFile} changed: restarting with the new settings`),
                        Effect.sync(() => (project = next)).pipe(Effect.zipRight(FiberMap.run(running, keyOf(next), supervised(next))))
                      )
                ),
                Effect.catchAll((error) => Effect.logError(`${error.message}; keeping the last good config`)),
                Effect.annotateLogs({ project: project.name })
              )
            )
          )

        for (const project of projects) {
          yield* FiberMap.run(running, keyOf(project), supervised(project))
          yield* Effect.forkScoped(reloads(project))
        }
        return yield* Effect.never
      })
    )

  return Supervisor.of({ run })
})

export const layer = Layer.effect(Supervisor, make)

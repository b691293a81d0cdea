/**
 * Runs the resolved projects in this process, each as its own fiber. A project that stops with an
 * error is reported with its name and does not stop the others; the command fails only when every
 * project has stopped.
 */
import { Data, Effect, Either } from "effect"
import type { ResolvedProject } from "../schemas/ConfigFile.js"
import { defaultSyncOptions, reconcileOnce, syncProject, type SyncOptions } from "./syncProject.js"

export interface RunOptions {
  readonly noDelete: boolean
  readonly force: boolean
}

const syncOptions = (options: RunOptions): SyncOptions => ({
  ...defaultSyncOptions,
  noDelete: options.noDelete,
  safety: { ...defaultSyncOptions.safety, force: options.force }
})

export const runSync = (projects: ReadonlyArray<ResolvedProject>, options: RunOptions = { noDelete: false, force: false }) =>
  Effect.gen(function* () {
    const outcomes = yield* Effect.forEach(
      projects,
      (project) =>
        syncProject(project, syncOptions(options)).pipe(
          Effect.tapError((error) => Effect.logError(`stopped: ${error.message}`).pipe(Effect.annotateLogs({ project: project.name }))),
          Effect.either
        ),
      { concurrency: "unbounded" }
    )
    const failures = outcomes.filter(Either.isLeft)
    if (failures.length === outcomes.length && failures.length > 0) return yield* Effect.fail(failures[0]!.left)
  })

/** `sicksync once`: every project reconciled once; fails if any destination could not be brought in sync. */
export const runOnce = (projects: ReadonlyArray<ResolvedProject>, options: RunOptions & { readonly dryRun: boolean }) =>
  Effect.gen(function* () {
    const outcomes = yield* Effect.forEach(
      projects,
      (project) => Effect.either(reconcileOnce(project, syncOptions(options), options.dryRun)),
      { concurrency: "unbounded" }
    )
    const failed = outcomes.filter(Either.isLeft).length
    if (failed > 0) {
      return yield* Effect.fail(new OnceFailed({ message: `${failed} of ${projects.length} project(s) could not be brought in sync (see above)` }))
    }
  })

export class OnceFailed extends Data.TaggedError("OnceFailed")<{ readonly message: string }> {}

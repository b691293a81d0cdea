/**
 * `sicksync once`: every project reconciled once, concurrently. (Live runs are the Supervisor's.)
 */
import { Data, Effect, Either } from "effect"
import type { ResolvedProject } from "../schemas/ConfigFile.js"
import { defaultSyncOptions, reconcileOnce, type SyncOptions } from "./syncProject.js"

export interface RunOptions {
  readonly noDelete: boolean
  readonly force: boolean
}

const syncOptions = (options: RunOptions): SyncOptions => ({
  ...defaultSyncOptions,
  noDelete: options.noDelete,
  safety: { ...defaultSyncOptions.safety, force: options.force }
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

/**
 * `sicksync once`: every project reconciled once, concurrently. (Live runs are the Supervisor's.)
 */
import * as Prompt from "@effect/cli/Prompt"
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
    // On a terminal, a large deletion is put to the user (one project at a time) instead of refused.
    if (process.stdin.isTTY && process.stdout.isTTY && !options.dryRun && !options.force) {
      for (const [i, outcome] of outcomes.entries()) {
        if (!Either.isLeft(outcome) || outcome.left._tag !== "DestinationHalted" || !outcome.left.unsafeDeletion) continue
        const project = projects[i]!
        const go = yield* Prompt.confirm({
          message: `[${project.name}] [${outcome.left.dest}] ${outcome.left.message.replace(/: refusing;.*$/, "")}. Delete them?`,
          initial: false
        }).pipe(Prompt.run, Effect.orElseSucceed(() => false))
        if (go) outcomes[i] = yield* Effect.either(reconcileOnce(project, syncOptions({ ...options, force: true }), false))
      }
    }
    const failed = outcomes.filter(Either.isLeft).length
    if (failed > 0) {
      return yield* Effect.fail(new OnceFailed({ message: `${failed} of ${projects.length} project(s) could not be brought in sync (see above)` }))
    }
  })

export class OnceFailed extends Data.TaggedError("OnceFailed")<{ readonly message: string }> {}

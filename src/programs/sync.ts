/**
 * Runs the resolved projects in this process, each as its own fiber. A project that stops with an
 * error is reported with its name and does not stop the others; the command fails only when every
 * project has stopped.
 */
import { Effect, Either } from "effect"
import type { ResolvedProject } from "../schemas/ConfigFile.js"
import { syncProject } from "./syncProject.js"

export const runSync = (projects: ReadonlyArray<ResolvedProject>) =>
  Effect.gen(function* () {
    const outcomes = yield* Effect.forEach(
      projects,
      (project) =>
        syncProject(project).pipe(
          Effect.tapError((error) => Effect.logError(`stopped: ${error.message}`).pipe(Effect.annotateLogs({ project: project.name }))),
          Effect.either
        ),
      { concurrency: "unbounded" }
    )
    const failures = outcomes.filter(Either.isLeft)
    if (failures.length === outcomes.length && failures.length > 0) return yield* Effect.fail(failures[0]!.left)
  })

/**
 * What the local watcher reports and what the coalescer hands to the sync path. Data only.
 *
 * Paths are relative to the project root, `/`-separated, never empty (the root itself is never
 * reported), never `.`/`..` segments, no leading or trailing `/`.
 */
import { Schema } from "effect"

/** A project-relative path: `a/b/c.ts`. */
export const RelativePath = Schema.String.pipe(
  Schema.filter((p) => p.length > 0 && p.split("/").every((s) => s !== "" && s !== "." && s !== ".."), {
    message: () => "expected a non-empty, /-separated path relative to the project root"
  })
)

export const FileEventKind = Schema.Literal("add", "change", "unlink", "addDir", "unlinkDir")
export type FileEventKind = typeof FileEventKind.Type

/** One raw watcher event (chokidar's vocabulary). */
export const FileEvent = Schema.Struct({
  kind: FileEventKind,
  path: RelativePath
})
export type FileEvent = typeof FileEvent.Type

export const ChangeKind = Schema.Literal("upsert", "remove")
export type ChangeKind = typeof ChangeKind.Type

/**
 * The net effect of a burst on one path, as the coalescer folds it.
 * - `upsert`: the path exists now (file, directory or symlink); send its *current* local state.
 *   The path may be gone again by the time it is read: then treat it as nothing to do
 *   (a later event reports the removal).
 * - `remove`: the path (and, for a directory, everything under it) is gone.
 */
export const Change = Schema.Struct({
  path: RelativePath,
  kind: ChangeKind
})
export type Change = typeof Change.Type

/**
 * Excludes: the one matcher (gitignore semantics, via the `ignore` package) that the watcher, the
 * live sync path and reconciliation all share, so they never disagree about what is synced.
 *
 * Rules are, in order (later rules win, as in git): the lines of every `excludesFile` in the order
 * given, then the project's `excludes`. So `"!keep.log"` in `excludes` re-includes a file that
 * `.gitignore` ignores with `*.log`. All patterns are anchored at the project root (like git's
 * `core.excludesFile`), whatever directory an excludes file lives in.
 *
 * Git semantics that follow: a path inside an excluded directory is excluded, and cannot be
 * re-included by a negation (`node_modules/` + `!node_modules/x` keeps `node_modules/x` excluded);
 * `dir/` matches only directories; `/x` matches only at the root; `#` starts a comment.
 */
import { Data, Effect } from "effect"
import ignore from "ignore"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { DEFAULT_EXCLUDES, DEFAULT_EXCLUDES_FILE } from "../schemas/ConfigFile.js"

// ---- errors -----------------------------------------------------------------------------------

/** An excludes file exists (or might) but cannot be read. A missing file is not an error. */
export class ExcludesFileError extends Data.TaggedError("ExcludesFileError")<{
  /** Absolute path of the file. */
  readonly file: string
  readonly cause: unknown
}> {
  override get message(): string {
    const code = (this.cause as NodeJS.ErrnoException | undefined)?.code
    return `cannot read excludes file ${this.file}${code ? ` (${code})` : ""}`
  }
}

// ---- the matcher --------------------------------------------------------------------------------

export interface Excludes {
  /**
   * Is this project-relative, `/`-separated path excluded? `isDirectory` says what the path is
   * (a symlink counts as a file, as in git). The root itself (`""`/`"."`) and paths outside the
   * root are never excluded.
   */
  readonly isExcluded: (relPath: string, isDirectory: boolean) => boolean
  /** The rules in effect, in order (for `sicksync info` / diagnostics). */
  readonly patterns: ReadonlyArray<string>
}

export interface PatternOptions {
  /** Match case-insensitively. Default: true on macOS and Windows, false elsewhere (like git). */
  readonly ignoreCase?: boolean
}

const defaultIgnoreCase = process.platform === "darwin" || process.platform === "win32"

/** Pure constructor: a matcher from gitignore lines (a line may itself hold several lines). */
export const fromPatterns = (lines: ReadonlyArray<string>, options: PatternOptions = {}): Excludes => {
  const patterns = lines.flatMap((l) => l.split(/\r?\n/))
  const ig = ignore({ ignorecase: options.ignoreCase ?? defaultIgnoreCase }).add(patterns)
  const isExcluded = (relPath: string, isDirectory: boolean): boolean => {
    let p = relPath.startsWith("./") ? relPath.slice(2) : relPath
    while (p.endsWith("/")) p = p.slice(0, -1)
    if (p === "" || p === "." || p === ".." || p.startsWith("../") || p.startsWith("/")) return false
    return ig.ignores(isDirectory ? `${p}/` : p)
  }
  return { isExcluded, patterns }
}

/** Excludes nothing. */
export const none: Excludes = fromPatterns([])

export interface ExcludesOptions {
  /** Absolute project root. */
  readonly root: string
  /** gitignore lines. Default: `DEFAULT_EXCLUDES` (`.git`, `.idea`, `*.swp`, `.svn`). */
  readonly excludes?: ReadonlyArray<string>
  /** Files of gitignore lines, relative to `root` (or absolute). Missing files are skipped. Default `[".gitignore"]`. */
  readonly excludesFile?: string | ReadonlyArray<string>
  readonly ignoreCase?: boolean
}

/** Reads the excludes files (relative to the root, not the cwd) and builds the matcher. */
export const makeExcludes = Effect.fn("Excludes.make")(function* (options: ExcludesOptions) {
  const files = options.excludesFile === undefined
    ? DEFAULT_EXCLUDES_FILE
    : typeof options.excludesFile === "string"
    ? [options.excludesFile]
    : options.excludesFile
  const fromFiles: Array<string> = []
  for (const f of files) {
    const file = path.resolve(options.root, f)
    const text = yield* Effect.tryPromise({
      try: () => fs.readFile(file, "utf8").catch((e: NodeJS.ErrnoException) => e.code === "ENOENT" ? "" : Promise.reject(e)),
      catch: (cause) => new ExcludesFileError({ file, cause })
    })
    fromFiles.push(text)
  }
  return fromPatterns(
    [...fromFiles, ...(options.excludes ?? DEFAULT_EXCLUDES)],
    options.ignoreCase === undefined ? {} : { ignoreCase: options.ignoreCase }
  )
})

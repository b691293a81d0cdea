/**
 * DestinationFs: every filesystem operation the daemon performs under a session's destination root.
 *
 * Confinement rules (DESIGN §4):
 * - paths are relative to the root, `/`-separated; empty and `.` segments are normalised away;
 *   absolute paths, the empty path, `..` segments and NUL bytes are rejected;
 * - every parent directory is walked component by component with `lstat`; a symlinked component is
 *   resolved with `realpath` and must stay inside the root, the walk continues from the real path;
 * - the final component is never followed: it is replaced or removed, not its target;
 * - the root itself is never removed, renamed or written over.
 *
 * `root` arguments must be values returned by `resolveRoot` (real paths).
 */
import { Context, Data, Effect, Either, Layer, Option, Scope, Stream } from "effect"
import * as crypto from "node:crypto"
import * as fs from "node:fs"
import * as fsp from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import type { ManifestEntry } from "../schemas/Protocol.js"

// ---- errors -----------------------------------------------------------------------------------

export type ConfinementReason = "empty" | "absolute" | "dot-dot" | "nul" | "root" | "symlink-escape"

/** The path is not allowed under the root (maps to `OpFailed{code:"confinement"}`). */
export class ConfinementError extends Data.TaggedError("ConfinementError")<{
  readonly root: string
  readonly path: string
  readonly reason: ConfinementReason
  readonly message: string
}> {}

/** A filesystem call failed (maps to `OpFailed{code:"io"}`). */
export class DestinationIoError extends Data.TaggedError("DestinationIoError")<{
  readonly op: string
  readonly path: string
  readonly code: string | undefined
  readonly message: string
  readonly cause?: unknown
}> {}

export type RootRejectReason = "not-absolute" | "nul" | "filesystem-root" | "home" | "home-ancestor" | "state-dir" | "not-a-directory" | "io"

/** A Hello's `destinationRoot` is not acceptable (maps to `Rejected{reason:"root"}`). */
export class RootRejected extends Data.TaggedError("RootRejected")<{
  readonly destinationRoot: string
  readonly reason: RootRejectReason
  readonly message: string
}> {}

export type DestinationError = ConfinementError | DestinationIoError

// ---- pure path helpers --------------------------------------------------------------------------

/**
 * Normalises a wire path into its segments. `a//b` and `./a` are normalised; the result is empty for
 * the root itself (`.`, `./`). The empty string, absolute paths, `..` and NUL are rejected.
 */
export const normalizeRelPath = (rel: string): Either.Either<ReadonlyArray<string>, ConfinementReason> => {
  if (rel.length === 0) return Either.left("empty")
  if (rel.includes("\0")) return Either.left("nul")
  if (rel.startsWith("/")) return Either.left("absolute")
  const segments: Array<string> = []
  for (const segment of rel.split("/")) {
    if (segment === "" || segment === ".") continue
    if (segment === "..") return Either.left("dot-dot")
    segments.push(segment)
  }
  return Either.right(segments)
}

/** True when `p` is `root` or inside it (both absolute, normalised). */
export const isInside = (p: string, root: string): boolean =>
  p === root || p.startsWith(root.endsWith("/") ? root : root + "/")

const TEMP_RE = /^\..*\.sicksync-[0-9a-f]{16}\.tmp$/

/** Our own in-progress temp files (`.name.sicksync-<hex>.tmp`); skipped by the manifest. */
export const isTempName = (name: string): boolean => TEMP_RE.test(name)

const tempName = (name: string): string =>
  // keep within NAME_MAX (255 bytes) for long names
  `.${Buffer.from(name).subarray(0, 200).toString("utf8").replace(/\uFFFD+$/, "")}.sicksync-${crypto.randomBytes(8).toString("hex")}.tmp`

const confinementMessage: Record<ConfinementReason, string> = {
  empty: "empty path",
  absolute: "absolute paths are not allowed",
  "dot-dot": "'..' segments are not allowed",
  nul: "NUL byte in path",
  root: "operation on the destination root itself is not allowed",
  "symlink-escape": "a parent directory resolves outside the destination root through a symlink"
}

// ---- service ------------------------------------------------------------------------------------

/** An open temp file for one `Write`; scoped: closing the scope before `commit` deletes the temp file. */
export interface WriteHandle {
  readonly target: string
  readonly tempPath: string
  /** Appends bytes to the temp file (all of them, or fails). */
  readonly write: (bytes: Uint8Array) => Effect.Effect<void, DestinationIoError>
  /** fchmod, set mtime (atime = mtime), close, then rename over the target (replacing a directory tree). */
  readonly commit: (mode: number, mtimeMs: number) => Effect.Effect<void, DestinationError>
}

export interface DestinationFsApi {
  /** Resolves a Hello's `destinationRoot` (`~/x` or absolute), creates it, returns its real path. */
  readonly resolveRoot: (destinationRoot: string) => Effect.Effect<string, RootRejected>
  /** Checks a relative path and resolves its parent (created when `createParents`); `None` if a parent is missing. */
  readonly confine: (
    root: string,
    rel: string,
    options?: { readonly createParents?: boolean }
  ) => Effect.Effect<Option.Option<{ readonly parent: string; readonly name: string; readonly target: string }>, DestinationError>
  readonly openWrite: (root: string, rel: string) => Effect.Effect<WriteHandle, DestinationError, Scope.Scope>
  readonly mkdir: (root: string, rel: string, mode: number, mtimeMs?: number) => Effect.Effect<void, DestinationError>
  readonly remove: (root: string, rel: string) => Effect.Effect<void, DestinationError>
  readonly rename: (root: string, from: string, to: string) => Effect.Effect<void, DestinationError>
  readonly symlink: (root: string, rel: string, linkTarget: string, mtimeMs?: number) => Effect.Effect<void, DestinationError>
  /** Walks the root with lstat (symlinks not followed), skipping our temp files. */
  readonly manifest: (root: string) => Stream.Stream<ManifestEntry, DestinationIoError>
}

export class DestinationFs extends Context.Tag("sicksync/DestinationFs")<DestinationFs, DestinationFsApi>() {}

// ---- implementation -----------------------------------------------------------------------------

const errnoCode = (cause: unknown): string | undefined =>
  typeof cause === "object" && cause !== null && "code" in cause && typeof cause.code === "string" ? cause.code : undefined

const ioError = (op: string, p: string, cause: unknown) =>
  new DestinationIoError({
    op,
    path: p,
    code: errnoCode(cause),
    message: `${op} ${p}: ${cause instanceof Error ? cause.message : String(cause)}`,
    cause
  })

const tryFs = <A>(op: string, p: string, f: () => Promise<A>): Effect.Effect<A, DestinationIoError> =>
  Effect.tryPromise({ try: f, catch: (cause) => ioError(op, p, cause) })

/** lstat, `undefined` when missing. */
const lstatOrUndefined = (p: string): Effect.Effect<fs.Stats | undefined, DestinationIoError> =>
  Effect.tryPromise({
    try: () => fsp.lstat(p).catch((e) => (errnoCode(e) === "ENOENT" ? undefined : Promise.reject(e))),
    catch: (cause) => ioError("lstat", p, cause)
  })

const ignoreMissing = <A>(p: Promise<A>): Promise<A | undefined> =>
  p.catch((e) => (errnoCode(e) === "ENOENT" ? undefined : Promise.reject(e)))

const removeTree = (p: string) => tryFs("rm", p, () => fsp.rm(p, { recursive: true, force: true }))

/** Removes whatever is at `p` (file, symlink or tree); missing is fine. Never follows `p` itself. */
const removeAny = (p: string) =>
  Effect.flatMap(lstatOrUndefined(p), (st) =>
    st === undefined ? Effect.void : st.isDirectory() ? removeTree(p) : tryFs("unlink", p, () => ignoreMissing(fsp.unlink(p))))

const toSeconds = (ms: number) => ms / 1000

export const make = (options: { readonly home: string }): DestinationFsApi => {
  const home = path.resolve(options.home)
  const stateDir = path.join(home, ".sicksync")

  const confinementError = (root: string, rel: string, reason: ConfinementReason) =>
    new ConfinementError({ root, path: rel, reason, message: `${JSON.stringify(rel)}: ${confinementMessage[reason]}` })

  const segmentsOf = (root: string, rel: string, allowRoot: boolean) =>
    Either.match(normalizeRelPath(rel), {
      onLeft: (reason) => Effect.fail(confinementError(root, rel, reason)),
      onRight: (segments) =>
        segments.length === 0 && !allowRoot ? Effect.fail(confinementError(root, rel, "root")) : Effect.succeed(segments)
    })

  /**
   * Walks the parent components of `segments` from `root`. Returns the real path of the parent directory,
   * or `None` when a component is missing and `create` is false.
   */
  const resolveParent = (root: string, rel: string, segments: ReadonlyArray<string>, create: boolean) =>
    Effect.gen(function*() {
      let current = root
      for (let i = 0; i < segments.length - 1; i++) {
        const next = current + "/" + segments[i]
        const st = yield* lstatOrUndefined(next)
        if (st === undefined) {
          if (!create) return Option.none<string>()
          yield* tryFs("mkdir", next, () =>
            fsp.mkdir(next).catch((e) => (errnoCode(e) === "EEXIST" ? undefined : Promise.reject(e))))
          const again = yield* lstatOrUndefined(next)
          if (again === undefined || !again.isDirectory()) {
            return yield* Effect.fail(ioError("mkdir", next, new Error("parent directory changed while it was created")))
          }
          current = next
        } else if (st.isDirectory()) {
          current = next
        } else if (st.isSymbolicLink()) {
          const real = yield* Effect.tryPromise({
            try: () => fsp.realpath(next),
            catch: (cause) => ioError("realpath", next, cause)
          })
          if (!isInside(real, root)) return yield* Effect.fail(confinementError(root, rel, "symlink-escape"))
          const target = yield* tryFs("stat", real, () => fsp.stat(real))
          if (!target.isDirectory()) {
            return yield* Effect.fail(ioError("stat", next, Object.assign(new Error("not a directory"), { code: "ENOTDIR" })))
          }
          current = real
        } else {
          return yield* Effect.fail(ioError("lstat", next, Object.assign(new Error("not a directory"), { code: "ENOTDIR" })))
        }
      }
      return Option.some(current)
    })

  const confine: DestinationFsApi["confine"] = (root, rel, opts) =>
    Effect.gen(function*() {
      const segments = yield* segmentsOf(root, rel, false)
      const parent = yield* resolveParent(root, rel, segments, opts?.createParents ?? false)
      const name = segments[segments.length - 1]!
      return Option.map(parent, (parent) => ({ parent, name, target: parent + "/" + name }))
    })

  const resolveRoot = Effect.fn("DestinationFs.resolveRoot")(function*(destinationRoot: string) {
    const reject = (reason: RootRejectReason, message: string) =>
      Effect.fail(new RootRejected({ destinationRoot, reason, message }))
    if (destinationRoot.includes("\0")) return yield* reject("nul", "NUL byte in destination root")
    let resolved: string
    if (destinationRoot === "~" || destinationRoot.startsWith("~/")) {
      resolved = path.resolve(home, destinationRoot.slice(2))
    } else if (path.isAbsolute(destinationRoot)) {
      resolved = path.resolve(destinationRoot)
    } else {
      return yield* reject("not-absolute", `destination root must be absolute or start with ~/: ${destinationRoot}`)
    }
    const check = (p: string, homeP: string, stateP: string) =>
      p === "/"
        ? reject("filesystem-root", "destination root must not be /")
        : p === homeP
        ? reject("home", "destination root must not be the home directory itself")
        : isInside(homeP, p)
        ? reject("home-ancestor", "destination root must not contain the home directory")
        : isInside(p, stateP)
        ? reject("state-dir", "destination root must not be inside ~/.sicksync")
        : Effect.void
    yield* check(resolved, home, stateDir)
    const io = (cause: unknown) =>
      new RootRejected({
        destinationRoot,
        reason: "io",
        message: `cannot use destination root ${resolved}: ${cause instanceof Error ? cause.message : String(cause)}`
      })
    yield* Effect.tryPromise({
      // EEXIST: something other than a directory is there; the stat below says so in plain words
      try: () => fsp.mkdir(resolved, { recursive: true }).catch((e) => (errnoCode(e) === "EEXIST" ? undefined : Promise.reject(e))),
      catch: io
    })
    const real = yield* Effect.tryPromise({ try: () => fsp.realpath(resolved), catch: io })
    const st = yield* Effect.tryPromise({ try: () => fsp.stat(real), catch: io })
    if (!st.isDirectory()) return yield* reject("not-a-directory", `destination root is not a directory: ${resolved}`)
    const realHome = yield* Effect.promise(() => fsp.realpath(home).catch(() => home))
    const realState = yield* Effect.promise(() => fsp.realpath(stateDir).catch(() => stateDir))
    yield* check(real, realHome, realState)
    return real
  })

  const openWrite = (root: string, rel: string) =>
    Effect.gen(function*() {
      const segments = yield* segmentsOf(root, rel, false)
      const parent = Option.getOrThrow(yield* resolveParent(root, rel, segments, true))
      const name = segments[segments.length - 1]!
      const target = parent + "/" + name
      const tempPath = parent + "/" + tempName(name)
      let committed = false
      let closed = false
      const fh = yield* Effect.acquireRelease(
        tryFs("open", tempPath, () =>
          fsp.open(
            tempPath,
            fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW,
            0o600
          )),
        (fh) =>
          committed ? Effect.void : Effect.promise(async () => {
            if (!closed) await fh.close().catch(() => undefined)
            await fsp.unlink(tempPath).catch(() => undefined)
          })
      )
      const write = (bytes: Uint8Array) =>
        tryFs("write", tempPath, async () => {
          let offset = 0
          while (offset < bytes.byteLength) {
            const { bytesWritten } = await fh.write(bytes, offset, bytes.byteLength - offset)
            offset += bytesWritten
          }
        })
      const commit = (mode: number, mtimeMs: number) =>
        Effect.gen(function*() {
          yield* tryFs("chmod", tempPath, () => fh.chmod(mode))
          yield* tryFs("utimes", tempPath, () => fh.utimes(toSeconds(mtimeMs), toSeconds(mtimeMs)))
          closed = true
          yield* tryFs("close", tempPath, () => fh.close())
          // the parent may have been replaced by another operation while we streamed: check it again
          const again = yield* resolveParent(root, rel, segments, false)
          if (Option.isNone(again) || again.value !== parent) {
            return yield* Effect.fail(confinementError(root, rel, "symlink-escape"))
          }
          const st = yield* lstatOrUndefined(target)
          if (st?.isDirectory()) yield* removeTree(target)
          yield* tryFs("rename", target, () => fsp.rename(tempPath, target))
          committed = true
        })
      return { target, tempPath, write, commit } satisfies WriteHandle
    })

  const mkdir = Effect.fn("DestinationFs.mkdir")(function*(root: string, rel: string, mode: number, mtimeMs?: number) {
    const segments = yield* segmentsOf(root, rel, true)
    if (segments.length === 0) return // the root exists already
    const parent = Option.getOrThrow(yield* resolveParent(root, rel, segments, true))
    const target = parent + "/" + segments[segments.length - 1]!
    const st = yield* lstatOrUndefined(target)
    if (st !== undefined && !st.isDirectory()) yield* removeAny(target)
    if (st === undefined || !st.isDirectory()) yield* tryFs("mkdir", target, () => fsp.mkdir(target, { mode: 0o700 }))
    // O_NOFOLLOW | O_DIRECTORY: never chmod/utimes through a symlink swapped in meanwhile
    yield* tryFs("chmod", target, async () => {
      const fh = await fsp.open(target, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY | fs.constants.O_NOFOLLOW)
      try {
        await fh.chmod(mode)
        if (mtimeMs !== undefined) await fh.utimes(toSeconds(mtimeMs), toSeconds(mtimeMs))
      } finally {
        await fh.close()
      }
    })
  })

  const remove = Effect.fn("DestinationFs.remove")(function*(root: string, rel: string) {
    const segments = yield* segmentsOf(root, rel, false)
    const parent = yield* resolveParent(root, rel, segments, false)
    if (Option.isNone(parent)) return
    yield* removeAny(parent.value + "/" + segments[segments.length - 1]!)
  })

  const rename = Effect.fn("DestinationFs.rename")(function*(root: string, from: string, to: string) {
    const fromSegments = yield* segmentsOf(root, from, false)
    const toSegments = yield* segmentsOf(root, to, false)
    const fromParent = yield* resolveParent(root, from, fromSegments, false)
    const source = Option.map(fromParent, (p) => p + "/" + fromSegments[fromSegments.length - 1]!)
    const sourceStat = Option.isSome(source) ? yield* lstatOrUndefined(source.value) : undefined
    if (Option.isNone(source) || sourceStat === undefined) {
      return yield* Effect.fail(ioError("rename", from, Object.assign(new Error("no such file or directory"), { code: "ENOENT" })))
    }
    const toParent = Option.getOrThrow(yield* resolveParent(root, to, toSegments, true))
    const target = toParent + "/" + toSegments[toSegments.length - 1]!
    if (target === source.value) return
    if (isInside(source.value, target)) {
      return yield* Effect.fail(ioError("rename", to, Object.assign(new Error("target contains the source"), { code: "EINVAL" })))
    }
    const targetStat = yield* lstatOrUndefined(target)
    if (targetStat?.isDirectory()) yield* removeTree(target)
    yield* tryFs("rename", from, () => fsp.rename(source.value, target))
  })

  const symlink = Effect.fn("DestinationFs.symlink")(function*(root: string, rel: string, linkTarget: string, mtimeMs?: number) {
    const segments = yield* segmentsOf(root, rel, false)
    const parent = Option.getOrThrow(yield* resolveParent(root, rel, segments, true))
    const name = segments[segments.length - 1]!
    const target = parent + "/" + name
    const temp = parent + "/" + tempName(name)
    yield* Effect.gen(function*() {
      yield* tryFs("symlink", rel, () => fsp.symlink(linkTarget, temp))
      if (mtimeMs !== undefined) yield* tryFs("lutimes", rel, () => fsp.lutimes(temp, toSeconds(mtimeMs), toSeconds(mtimeMs)))
      const st = yield* lstatOrUndefined(target)
      if (st?.isDirectory()) yield* removeTree(target)
      yield* tryFs("rename", rel, () => fsp.rename(temp, target))
    }).pipe(Effect.onError(() => Effect.promise(() => fsp.unlink(temp).catch(() => undefined))))
  })

  const manifest = (root: string): Stream.Stream<ManifestEntry, DestinationIoError> => {
    async function* walk(): AsyncGenerator<ManifestEntry> {
      const pending: Array<string> = [""]
      while (pending.length > 0) {
        const dirRel = pending.pop()!
        const dirAbs = dirRel === "" ? root : root + "/" + dirRel
        let dir: fs.Dir
        try {
          dir = await fsp.opendir(dirAbs)
        } catch (e) {
          if (errnoCode(e) === "ENOENT" || errnoCode(e) === "ENOTDIR") continue // vanished meanwhile
          throw e
        }
        for await (const dirent of dir) {
          if (isTempName(dirent.name)) continue
          const rel = dirRel === "" ? dirent.name : dirRel + "/" + dirent.name
          const abs = root + "/" + rel
          const st = await ignoreMissing(fsp.lstat(abs))
          if (st === undefined) continue
          const base = { path: rel, size: st.size, mtime: st.mtimeMs, mode: st.mode & 0o7777 }
          if (st.isDirectory()) {
            yield { ...base, type: "dir", size: 0 }
            pending.push(rel)
          } else if (st.isFile()) {
            yield { ...base, type: "file" }
          } else if (st.isSymbolicLink()) {
            const target = await ignoreMissing(fsp.readlink(abs))
            if (target !== undefined) yield { ...base, type: "symlink", target }
          }
          // sockets, fifos and devices are not mirrored
        }
      }
    }
    return Stream.suspend(() => Stream.fromAsyncIterable(walk(), (cause) => ioError("manifest", root, cause)))
  }

  return DestinationFs.of({
    resolveRoot,
    confine,
    openWrite,
    mkdir,
    remove,
    rename,
    symlink,
    manifest
  })
}

/** Live layer; `home` defaults to `os.homedir()` (which honours `$HOME`). */
export const layer = (options?: { readonly home?: string }): Layer.Layer<DestinationFs> =>
  Layer.sync(DestinationFs, () => make({ home: options?.home ?? os.homedir() }))

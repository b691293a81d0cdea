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
 *
 * Speed (issue #4): each operation is one chain of plain fs calls wrapped in a single effect, and
 * parent directories already verified as real directories (no symlink on the way) are remembered for
 * `DIR_TTL_MS`. Any operation that removes or replaces a directory, or renames one, forgets them all,
 * and a walk that began before that never stores its result. Paths through a symlinked component are
 * walked and checked with `realpath` every time. The cache is shared by every session of the daemon,
 * keyed by real path, so one session removing a directory invalidates it for the others too.
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
  /** Appends several buffers, in order, with as few syscalls as possible. */
  readonly writeChunks: (chunks: ReadonlyArray<Uint8Array>) => Effect.Effect<void, DestinationIoError>
  /**
   * fchmod (unless the temp file was created with that mode already), set mtime (atime = mtime), close,
   * check the parent again, then rename over the target (replacing a directory tree).
   */
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
  /**
   * Creates the temp file for a streamed write next to its target. `mode`, when known, is the mode the
   * file will be committed with: the temp file is then created with it, which can spare `commit` an fchmod.
   */
  readonly openWrite: (root: string, rel: string, mode?: number) => Effect.Effect<WriteHandle, DestinationError, Scope.Scope>
  /**
   * A whole write whose bytes are all at hand, in one go: temp file (O_EXCL, in the target's directory),
   * bytes, mode, mtime, close, rename. Nothing is left behind on failure. A promise, rejected with a
   * `DestinationError` only, not an effect: it is the daemon's path for each small file of a big sync,
   * where running a fiber per file cost the daemon a tenth of its CPU (measured).
   */
  readonly writeFile: (
    root: string,
    rel: string,
    chunks: ReadonlyArray<Uint8Array>,
    mode: number,
    mtimeMs: number
  ) => Promise<void>
  readonly mkdir: (root: string, rel: string, mode: number, mtimeMs?: number) => Effect.Effect<void, DestinationError>
  readonly remove: (root: string, rel: string) => Effect.Effect<void, DestinationError>
  /**
   * `mkdir` and `remove` as promises, rejected with a `DestinationError` only: the daemon's path for
   * them, as `writeFile` is for small files. A fiber and a span each cost its busiest thread ~25 µs
   * an operation: 50 ms of an initial sync's 2,000 directories (measured), on top of the calls.
   */
  readonly mkdirNow: (root: string, rel: string, mode: number, mtimeMs?: number) => Promise<void>
  readonly removeNow: (root: string, rel: string) => Promise<void>
  readonly rename: (root: string, from: string, to: string) => Effect.Effect<void, DestinationError>
  readonly symlink: (root: string, rel: string, linkTarget: string, mtimeMs?: number) => Effect.Effect<void, DestinationError>
  /** Walks the root with lstat (symlinks not followed), skipping our temp files. */
  readonly manifest: (root: string) => Stream.Stream<ManifestEntry, DestinationIoError>
  /**
   * The same walk in pages of at most `pageSize` entries (the last one may be shorter; none are empty),
   * each read when the consumer pulls it.
   */
  readonly manifestPages: (root: string, pageSize: number) => Stream.Stream<ReadonlyArray<ManifestEntry>, DestinationIoError>
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

const errnoError = (code: string, message: string) => Object.assign(new Error(message), { code })

/** Our own typed failures pass through; anything else thrown by `op` on `p` becomes a `DestinationIoError`. */
const asDestinationError = (op: string, p: string) => (cause: unknown): DestinationError =>
  cause instanceof ConfinementError || cause instanceof DestinationIoError ? cause : ioError(op, p, cause)

/** Runs one async chain of fs calls as a single effect. */
const run = <A>(op: string, p: string, f: () => Promise<A>): Effect.Effect<A, DestinationError> =>
  Effect.tryPromise({ try: f, catch: asDestinationError(op, p) })

/** `await step("open", p, promise)`: names the call and path in the error, like `tryFs` did. */
const step = <A>(op: string, p: string, promise: Promise<A>): Promise<A> => promise.catch((cause) => Promise.reject(ioError(op, p, cause)))

// Callback-based fs calls: lighter than fs/promises' FileHandle for the many short calls of small files.
const cb = <A>(f: (done: (err: NodeJS.ErrnoException | null, value?: A) => void) => void): Promise<A> =>
  new Promise((resolve, reject) => f((err, value) => (err ? reject(err) : resolve(value as A))))
const openFd = (p: string, flags: number, mode: number) => cb<number>((done) => fs.open(p, flags, mode, done))
const closeFd = (fd: number) => cb<void>((done) => fs.close(fd, done))
const fchmod = (fd: number, mode: number) => cb<void>((done) => fs.fchmod(fd, mode, done))
const futimes = (fd: number, seconds: number) => cb<void>((done) => fs.futimes(fd, seconds, seconds, done))
const renameP = (from: string, to: string) => cb<void>((done) => fs.rename(from, to, done))
const unlinkP = (p: string) => cb<void>((done) => fs.unlink(p, done))
const lstatP = (p: string) => cb<fs.Stats>((done) => fs.lstat(p, done))

/** lstat, `undefined` when missing. */
const lstatOrUndefined = (p: string): Promise<fs.Stats | undefined> =>
  lstatP(p).catch((e) => (errnoCode(e) === "ENOENT" ? undefined : Promise.reject(e)))

/**
 * A synchronous call, its failure naming the call and the path. Directory metadata calls on the hot
 * path (lstat, mkdir, utimes of parents and new directories: ~6,000 in a 20,000-file initial sync)
 * are synchronous: a few microseconds each, where an asynchronous one costs the main thread a
 * thread-pool round trip (lstat measured 4–8 µs of main-thread CPU synchronously, 20–24 µs
 * asynchronously; waking a pool thread is a hypercall on this VM). A new daemon paid the most: its
 * first initial sync went from 5.3–5.7 s to 4.9–5.2 s.
 */
const syncStep = <A>(op: string, p: string, f: () => A): A => {
  try {
    return f()
  } catch (cause) {
    throw ioError(op, p, cause)
  }
}

/** lstat, `undefined` when missing (synchronous). */
const lstatSyncOrUndefined = (p: string): fs.Stats | undefined => {
  try {
    return fs.lstatSync(p)
  } catch (e) {
    if (errnoCode(e) === "ENOENT") return undefined
    throw e
  }
}

/** mkdir(2): `true` when made, `false` when something is there already (synchronous). */
const mkdirSyncIfAbsent = (p: string, mode: number): boolean => {
  try {
    fs.mkdirSync(p, { mode })
    return true
  } catch (e) {
    if (errnoCode(e) === "EEXIST") return false
    throw e
  }
}

const noop = () => undefined

/** Writes every byte of `chunks` at the file's current offset (writev; partial writes are resumed). */
const writeAll = async (fd: number, chunks: ReadonlyArray<Uint8Array>): Promise<void> => {
  let list = chunks.filter((c) => c.byteLength > 0)
  while (list.length > 0) {
    const total = list.reduce((n, c) => n + c.byteLength, 0)
    const written = list.length === 1
      ? await cb<number>((done) => fs.write(fd, list[0]!, 0, list[0]!.byteLength, null, done))
      : await cb<number>((done) => fs.writev(fd, list as Array<NodeJS.ArrayBufferView>, done))
    if (written >= total) return
    let skip = written
    const rest: Array<Uint8Array> = []
    for (const c of list) {
      if (skip >= c.byteLength) skip -= c.byteLength
      else {
        rest.push(skip > 0 ? c.subarray(skip) : c)
        skip = 0
      }
    }
    list = rest
  }
}

const toSeconds = (ms: number) => ms / 1000

/** Files up to this size are removed with a synchronous unlink. */
const SYNC_UNLINK_BYTES = 1024 * 1024
/** Files up to this size are written with synchronous calls (see `writeSmallSync`). */
const SYNC_WRITE_BYTES = 64 * 1024
const O_TEMP = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW

/** How long a verified parent directory is trusted without another lstat (bounds races with other processes). */
const DIR_TTL_MS = 1_000
const MAX_CACHED_DIRS = 50_000

type ParentWalk = (root: string, rel: string, segments: ReadonlyArray<string>, create: boolean) => Promise<string | undefined>

export const make = (options: { readonly home: string }): DestinationFsApi => {
  const home = path.resolve(options.home)
  const stateDir = path.join(home, ".sicksync")
  /**
   * Temp-file name suffixes: this instance's id (8 hex digits), then 8 random ones, drawn in batches
   * (one `randomBytes` call per 1,024 names). A temp file with another instance's id was left by a
   * daemon that died mid-write (killed, or its machine rebooted): the manifest walk removes it.
   */
  const instance = crypto.randomBytes(4).toString("hex")
  let randomPool = Buffer.alloc(0)
  let randomOffset = 0
  const randomHex4 = (): string => {
    if (randomOffset + 4 > randomPool.byteLength) {
      randomPool = crypto.randomBytes(4 * 1024)
      randomOffset = 0
    }
    randomOffset += 4
    return randomPool.toString("hex", randomOffset - 4, randomOffset)
  }
  const tempName = (name: string): string =>
    // keep within NAME_MAX (255 bytes) for long names (a UTF-16 unit is at most 3 bytes of UTF-8)
    `.${name.length * 3 <= 200 ? name : Buffer.from(name).subarray(0, 200).toString("utf8").replace(/\uFFFD+$/, "")}.sicksync-${instance}${randomHex4()}.tmp`
  /** A temp name (see `isTempName`) of another instance: an orphan (see `tempName`). */
  const isOrphanTemp = (tempName: string): boolean => tempName.slice(-20, -12) !== instance

  // Read once: the daemon never changes it. open(2)/mkdir(2) apply it to the mode they are given.
  const umask = process.umask()
  /**
   * Roots where a file created with some permission bits gets exactly those (less the umask), as probed by
   * `resolveRoot`. Elsewhere (a default ACL on the root, a filesystem without Unix modes) every write and
   * mkdir sets its mode explicitly. A subdirectory with a default ACL of its own is not probed.
   */
  const exactRoots = new Set<string>()
  /** Whether a file created with `mode & 0o777` under `root` might not end up with exactly `mode`. */
  const needsChmod = (root: string, mode: number) => (mode & ~0o777) !== 0 || (mode & umask) !== 0 || !exactRoots.has(root)

  /** Creates a file with `0o666 & ~umask` in `root` and checks the mode it got. */
  const probeModes = async (root: string) => {
    const probe = root + "/" + tempName("mode-probe")
    const wanted = 0o666 & ~umask
    let fd: number | undefined
    try {
      fd = await openFd(probe, O_TEMP, wanted)
      const st = await cb<fs.Stats>((done) => fs.fstat(fd!, done))
      if ((st.mode & 0o7777) === wanted) exactRoots.add(root)
      else exactRoots.delete(root)
    } catch {
      exactRoots.delete(root)
    } finally {
      if (fd !== undefined) await closeFd(fd).catch(noop)
      await unlinkP(probe).catch(noop)
    }
  }

  // ---- verified parent directories --------------------------------------------------------------

  /** Real paths known (as of `at`) to be directories reached from their root without a symlink. */
  const verified = new Map<string, number>()
  let generation = 0
  const isVerified = (p: string) => {
    const at = verified.get(p)
    if (at === undefined) return false
    if (Date.now() - at < DIR_TTL_MS) return true
    verified.delete(p)
    return false
  }
  /** Stores a result obtained by a walk that began at `gen`, unless something was invalidated since. */
  const remember = (p: string, gen: number) => {
    if (gen !== generation) return
    if (verified.size >= MAX_CACHED_DIRS) verified.clear()
    verified.set(p, Date.now())
  }
  /** A directory was removed, replaced or moved: forget every verified directory. */
  const invalidate = () => {
    generation++
    verified.clear()
  }

  const confinementError = (root: string, rel: string, reason: ConfinementReason) =>
    new ConfinementError({ root, path: rel, reason, message: `${JSON.stringify(rel)}: ${confinementMessage[reason]}` })

  /** The path's segments, or throws a `ConfinementError`. */
  const segmentsOrThrow = (root: string, rel: string, allowRoot: boolean): ReadonlyArray<string> => {
    const normalized = normalizeRelPath(rel)
    if (Either.isLeft(normalized)) throw confinementError(root, rel, normalized.left)
    if (normalized.right.length === 0 && !allowRoot) throw confinementError(root, rel, "root")
    return normalized.right
  }

  const notADirectory = (op: string, p: string) => ioError(op, p, errnoError("ENOTDIR", "not a directory"))

  /**
   * Walks the parent components of `segments` from `root`. Returns the real path of the parent directory,
   * or `undefined` when a component is missing and `create` is false. Throws `ConfinementError` for a
   * symlinked component that resolves outside the root, `DestinationIoError` otherwise.
   */
  const resolveParent: ParentWalk = async (root, rel, segments, create) => {
    const last = segments.length - 1
    if (last <= 0) return root
    const whole = last === 1 ? root + "/" + segments[0] : root + "/" + segments.slice(0, last).join("/")
    if (isVerified(whole)) return whole
    return walkParent(root, rel, segments, create)
  }

  // Synchronous (see `syncStep`), so two walks never interleave: no result stored by one can be stale for another.
  const walkParent = (root: string, rel: string, segments: ReadonlyArray<string>, create: boolean): string | undefined => {
    const last = segments.length - 1
    const gen = generation
    let current = root
    /** No symlink on the way so far: `current` is both the lexical and the real path. */
    let plain = true
    for (let i = 0; i < last; i++) {
      const next = current + "/" + segments[i]
      if (plain && isVerified(next)) {
        current = next
        continue
      }
      let st = syncStep("lstat", next, () => lstatSyncOrUndefined(next))
      if (st === undefined) {
        if (!create) return undefined
        if (syncStep("mkdir", next, () => mkdirSyncIfAbsent(next, 0o777))) {
          current = next
          if (plain) remember(next, gen)
          continue
        }
        // something appeared meanwhile: judge it like any other component
        st = syncStep("lstat", next, () => lstatSyncOrUndefined(next))
        if (st === undefined) throw ioError("mkdir", next, new Error("parent directory changed while it was created"))
      }
      if (st.isDirectory()) {
        current = next
        if (plain) remember(next, gen)
      } else if (st.isSymbolicLink()) {
        const real = syncStep("realpath", next, () => fs.realpathSync.native(next))
        if (!isInside(real, root)) throw confinementError(root, rel, "symlink-escape")
        const target = syncStep("stat", real, () => fs.statSync(real))
        if (!target.isDirectory()) throw notADirectory("stat", next)
        current = real
        plain = false
      } else {
        throw notADirectory("lstat", next)
      }
    }
    return current
  }

  /** Removes the directory tree at `p` (never following symlinks in it). */
  const removeTree = async (p: string) => {
    await step("rm", p, fsp.rm(p, { recursive: true, force: true }))
    invalidate()
  }

  /** Removes whatever is at `p` (file, symlink or tree); missing is fine. Never follows `p` itself. */
  const removeAny = async (p: string) => {
    const seen = syncStep("lstat", p, () => lstatSyncOrUndefined(p))
    if (seen === undefined) return
    if (!seen.isDirectory()) {
      try {
        // A file or a symlink, nearly every removal, goes at once: on the thread pool, an unlink cost
        // the main thread ~80 µs here (waking a pool thread), the call itself ~10. Freeing a big file's
        // blocks may take long: those take the asynchronous way.
        if (seen.size <= SYNC_UNLINK_BYTES) fs.unlinkSync(p)
        else await unlinkP(p)
        return
      } catch (e) {
        const code = errnoCode(e)
        if (code === "ENOENT") return
        // a directory put there meanwhile: EISDIR on Linux, EPERM on macOS and the BSDs
        if (code !== "EISDIR" && code !== "EPERM") throw ioError("unlink", p, e)
        const now = syncStep("lstat", p, () => lstatSyncOrUndefined(p))
        if (now === undefined) return
        if (!now.isDirectory()) throw ioError("unlink", p, e)
      }
    }
    await removeTree(p)
  }

  /** rename(2) `from` over `target`; a directory tree in the way is removed first (rename would refuse it). */
  const replaceWith = async (from: string, target: string, op = "rename") => {
    try {
      await renameP(from, target)
      return
    } catch (e) {
      const code = errnoCode(e)
      if (code !== "EISDIR" && code !== "ENOTEMPTY" && code !== "EEXIST") throw ioError(op, target, e)
    }
    const st = await step("lstat", target, lstatOrUndefined(target))
    if (st?.isDirectory()) await removeTree(target)
    await step(op, target, renameP(from, target))
  }

  const confine: DestinationFsApi["confine"] = (root, rel, opts) =>
    run("confine", rel, async () => {
      const segments = segmentsOrThrow(root, rel, false)
      const parent = await resolveParent(root, rel, segments, opts?.createParents ?? false)
      const name = segments[segments.length - 1]!
      return parent === undefined ? Option.none() : Option.some({ parent, name, target: parent + "/" + name })
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
    yield* Effect.promise(() => probeModes(real))
    return real
  })

  /** Where a write to `rel` goes: its parent (created if needed), target and a fresh temp path beside it. */
  const writePaths = async (root: string, rel: string) => {
    const segments = segmentsOrThrow(root, rel, false)
    const parent = (await resolveParent(root, rel, segments, true))!
    const name = segments[segments.length - 1]!
    return { segments, parent, target: parent + "/" + name, tempPath: parent + "/" + tempName(name) }
  }

  /** Sets mode and mtime on the open temp file; `createdWith` is the mode it was created with. */
  const finishTemp = async (root: string, fd: number, tempPath: string, createdWith: number, mode: number, mtimeMs: number) => {
    if (createdWith !== mode || needsChmod(root, mode)) await step("chmod", tempPath, fchmod(fd, mode))
    await step("utimes", tempPath, futimes(fd, toSeconds(mtimeMs)))
  }

  /**
   * A small file's temp file, written in one synchronous go: the four thread-pool round trips of the
   * asynchronous calls cost the daemon more CPU than the calls themselves (into the page cache, a few
   * microseconds each; on this VM waking a pool thread is a hypercall).
   */
  const writeSmallSync = (
    root: string,
    tempPath: string,
    chunks: ReadonlyArray<Uint8Array>,
    createdWith: number,
    mode: number,
    mtimeMs: number
  ): void => {
    const fd = syncStep("open", tempPath, () => fs.openSync(tempPath, O_TEMP, createdWith))
    let open = true
    try {
      for (const chunk of chunks) {
        for (let done = 0; done < chunk.byteLength;) {
          done += syncStep("write", tempPath, () => fs.writeSync(fd, chunk, done, chunk.byteLength - done))
        }
      }
      if (createdWith !== mode || needsChmod(root, mode)) syncStep("chmod", tempPath, () => fs.fchmodSync(fd, mode))
      const seconds = toSeconds(mtimeMs)
      syncStep("utimes", tempPath, () => fs.futimesSync(fd, seconds, seconds))
      open = false
      syncStep("close", tempPath, () => fs.closeSync(fd))
    } catch (e) {
      if (open) fs.close(fd, noop)
      fs.unlink(tempPath, noop)
      throw e
    }
  }

  // The file descriptor never leaves this one promise chain, which closes it (and removes the temp file
  // unless it was renamed) on every path. The temp file is created with the final permission bits
  // (partial content is no more readable than the finished file will be), which spares the fchmod
  // unless the umask or special bits require it.
  const writeFile: DestinationFsApi["writeFile"] = (root, rel, chunks, mode, mtimeMs) =>
    writeWhole(root, rel, chunks, mode, mtimeMs).catch((cause) => Promise.reject(asDestinationError("write", rel)(cause)))
  const writeWhole = async (root: string, rel: string, chunks: ReadonlyArray<Uint8Array>, mode: number, mtimeMs: number) => {
    const { target, tempPath } = await writePaths(root, rel)
    const createdWith = mode & 0o777
    if (chunks.reduce((n, c) => n + c.byteLength, 0) <= SYNC_WRITE_BYTES) {
      writeSmallSync(root, tempPath, chunks, createdWith, mode, mtimeMs)
      // Renamed at once, over a file already there too: one call where a link and an unlink took two
      // (ext4: 10.5 against 12-13 µs a file; tmpfs 5.8 against 7.9). Renaming over a file makes ext4 also
      // start writing the new data out (auto_da_alloc), ~40 µs more for 10 KB, about what an asynchronous
      // rename costs the main thread here (~40 µs, waking a pool thread). A directory in the way is the
      // asynchronous path's.
      try {
        fs.renameSync(tempPath, target)
        return
      } catch {
        // below
      }
      return await replaceWith(tempPath, target).catch(async (e) => {
        await unlinkP(tempPath).catch(noop)
        throw e
      })
    }
    const fd = await step("open", tempPath, openFd(tempPath, O_TEMP, createdWith))
    let open = true
    try {
      await step("write", tempPath, writeAll(fd, chunks))
      await finishTemp(root, fd, tempPath, createdWith, mode, mtimeMs)
      open = false
      await step("close", tempPath, closeFd(fd))
      await replaceWith(tempPath, target)
    } catch (e) {
      if (open) await closeFd(fd).catch(noop)
      await unlinkP(tempPath).catch(noop)
      throw e
    }
  }

  const openWrite = (root: string, rel: string, mode?: number) =>
    Effect.gen(function*() {
      const { parent, segments, target, tempPath } = yield* run("open", rel, () => writePaths(root, rel))
      const createdWith = mode === undefined ? 0o600 : mode & 0o777
      let committed = false
      let closed = false
      const fd = yield* Effect.acquireRelease(
        run("open", tempPath, () => step("open", tempPath, openFd(tempPath, O_TEMP, createdWith))),
        (fd) =>
          committed ? Effect.void : Effect.promise(async () => {
            if (!closed) await closeFd(fd).catch(noop)
            await unlinkP(tempPath).catch(noop)
          })
      )
      const writeChunks = (chunks: ReadonlyArray<Uint8Array>) =>
        Effect.tryPromise({ try: () => writeAll(fd, chunks), catch: (cause) => ioError("write", tempPath, cause) })
      const write = (bytes: Uint8Array) => writeChunks([bytes])
      const commit = (mode: number, mtimeMs: number) =>
        run("commit", rel, async () => {
          await finishTemp(root, fd, tempPath, createdWith, mode, mtimeMs)
          closed = true
          await step("close", tempPath, closeFd(fd))
          // the parent may have been replaced while we streamed: check it again
          const again = await resolveParent(root, rel, segments, false)
          if (again !== parent) throw confinementError(root, rel, "symlink-escape")
          await replaceWith(tempPath, target)
          committed = true
        })
      return { target, tempPath, write, writeChunks, commit } satisfies WriteHandle
    })

  const mkdirNow = (root: string, rel: string, mode: number, mtimeMs?: number) =>
    (async () => {
      const segments = segmentsOrThrow(root, rel, true)
      if (segments.length === 0) return // the root exists already
      const gen = generation
      const parent = (await resolveParent(root, rel, segments, true))!
      const target = parent + "/" + segments[segments.length - 1]!
      const create = () => syncStep("mkdir", target, () => mkdirSyncIfAbsent(target, mode & 0o777))
      /** Its mode is exactly `mode` already: created just now by mkdir(2) with all of it, or found that way. */
      const created = create()
      let exact = created && !needsChmod(root, mode)
      if (!created) {
        const st = syncStep("lstat", target, () => lstatSyncOrUndefined(target))
        if (st?.isDirectory()) {
          exact = (st.mode & 0o7777) === mode
        } else {
          if (st !== undefined) {
            await removeAny(target)
            invalidate() // a file or a symlink is a directory now
          }
          if (!create()) throw ioError("mkdir", target, new Error("something else appeared while the directory was created"))
          exact = !needsChmod(root, mode)
        }
      }
      // a real directory under a verified parent: the files about to be written into it need no lstat
      remember(target, gen)
      if (exact) {
        // lutimes never follows a symlink swapped in meanwhile
        if (mtimeMs !== undefined) syncStep("utimes", target, () => fs.lutimesSync(target, toSeconds(mtimeMs), toSeconds(mtimeMs)))
        return
      }
      // O_NOFOLLOW | O_DIRECTORY: never chmod/utimes through a symlink swapped in meanwhile
      await step("chmod", target, (async () => {
        const fh = await fsp.open(target, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY | fs.constants.O_NOFOLLOW)
        try {
          await fh.chmod(mode)
          if (mtimeMs !== undefined) await fh.utimes(toSeconds(mtimeMs), toSeconds(mtimeMs))
        } finally {
          await fh.close()
        }
      })())
    })().catch((cause) => Promise.reject(asDestinationError("mkdir", rel)(cause)))

  const removeNow = (root: string, rel: string) =>
    (async () => {
      const segments = segmentsOrThrow(root, rel, false)
      const parent = await resolveParent(root, rel, segments, false)
      if (parent === undefined) return
      await removeAny(parent + "/" + segments[segments.length - 1]!)
    })().catch((cause) => Promise.reject(asDestinationError("remove", rel)(cause)))

  const mkdir = Effect.fn("DestinationFs.mkdir")(function*(root: string, rel: string, mode: number, mtimeMs?: number) {
    return yield* run("mkdir", rel, () => mkdirNow(root, rel, mode, mtimeMs))
  })

  const remove = Effect.fn("DestinationFs.remove")(function*(root: string, rel: string) {
    return yield* run("remove", rel, () => removeNow(root, rel))
  })

  const rename = Effect.fn("DestinationFs.rename")(function*(root: string, from: string, to: string) {
    return yield* run("rename", from, async () => {
      const fromSegments = segmentsOrThrow(root, from, false)
      const toSegments = segmentsOrThrow(root, to, false)
      const fromParent = await resolveParent(root, from, fromSegments, false)
      const source = fromParent === undefined ? undefined : fromParent + "/" + fromSegments[fromSegments.length - 1]!
      const sourceStat = source === undefined ? undefined : await step("lstat", source, lstatOrUndefined(source))
      if (source === undefined || sourceStat === undefined) {
        throw ioError("rename", from, errnoError("ENOENT", "no such file or directory"))
      }
      const toParent = (await resolveParent(root, to, toSegments, true))!
      const target = toParent + "/" + toSegments[toSegments.length - 1]!
      if (target === source) return
      if (isInside(source, target)) throw ioError("rename", to, errnoError("EINVAL", "target contains the source"))
      const targetStat = await step("lstat", target, lstatOrUndefined(target))
      if (targetStat?.isDirectory()) await removeTree(target)
      await step("rename", from, renameP(source, target))
      if (sourceStat.isDirectory() || sourceStat.isSymbolicLink()) invalidate()
    })
  })

  const symlink = Effect.fn("DestinationFs.symlink")(function*(root: string, rel: string, linkTarget: string, mtimeMs?: number) {
    return yield* run("symlink", rel, async () => {
      const segments = segmentsOrThrow(root, rel, false)
      const parent = (await resolveParent(root, rel, segments, true))!
      const name = segments[segments.length - 1]!
      const target = parent + "/" + name
      const temp = parent + "/" + tempName(name)
      try {
        await step("symlink", rel, fsp.symlink(linkTarget, temp))
        if (mtimeMs !== undefined) await step("lutimes", rel, fsp.lutimes(temp, toSeconds(mtimeMs), toSeconds(mtimeMs)))
        await replaceWith(temp, target, "rename")
      } catch (e) {
        await unlinkP(temp).catch(noop)
        throw e
      }
    })
  })

  // ---- manifest ---------------------------------------------------------------------------------

  /**
   * Walks the tree one page at a time with synchronous calls: a page of `pageSize` entries blocks for a
   * few milliseconds, while the same lstats through the thread pool cost several times that in waking
   * its threads (measured: 22,000 entries, daemon CPU 660-900 ms with async calls). Between pages the
   * caller sends the page, so other sessions are served in between.
   */
  const walkManifest = (root: string, pageSize: number) => {
    const pending: Array<string> = [""]
    // The directory being listed: its names are read at once (an fs.Dir read entry by entry costs
    // about a third more CPU in all), and handed out across pages.
    let open: { readonly prefix: string; readonly names: ReadonlyArray<string>; next: number } | undefined
    let cancelled = false
    const nextPage = (): ReadonlyArray<ManifestEntry> | undefined => {
      const page: Array<ManifestEntry> = []
      while (page.length < pageSize && !cancelled) {
        if (open === undefined) {
          const rel = pending.pop()
          if (rel === undefined) break
          try {
            open = { prefix: rel === "" ? "" : rel + "/", names: fs.readdirSync(rel === "" ? root : root + "/" + rel), next: 0 }
          } catch (e) {
            if (errnoCode(e) === "ENOENT" || errnoCode(e) === "ENOTDIR") continue // vanished meanwhile
            throw e
          }
        }
        if (open.next === open.names.length) {
          open = undefined
          continue
        }
        const name = open.names[open.next++]!
        if (isTempName(name)) {
          // Its write is gone with its daemon. Ours are files and symlinks: anything else is left alone.
          if (isOrphanTemp(name)) {
            try {
              fs.unlinkSync(root + "/" + open.prefix + name)
            } catch {
              // gone already, or not ours to remove
            }
          }
          continue
        }
        const entryPath = open.prefix + name
        const st = fs.lstatSync(root + "/" + entryPath, { throwIfNoEntry: false })
        if (st === undefined) continue
        const mode = st.mode & 0o7777
        if (st.isDirectory()) {
          page.push({ path: entryPath, type: "dir", size: 0, mtime: st.mtimeMs, mode })
          pending.push(entryPath)
        } else if (st.isFile()) {
          page.push({ path: entryPath, type: "file", size: st.size, mtime: st.mtimeMs, mode })
        } else if (st.isSymbolicLink()) {
          let target: string | undefined
          try {
            target = fs.readlinkSync(root + "/" + entryPath)
          } catch (e) {
            if (errnoCode(e) !== "ENOENT") throw e
          }
          if (target !== undefined) page.push({ path: entryPath, type: "symlink", size: st.size, mtime: st.mtimeMs, mode, target })
        }
        // sockets, fifos and devices are not mirrored
      }
      return page.length === 0 ? undefined : page
    }
    const next = () => new Promise<ReadonlyArray<ManifestEntry> | undefined>((resolve) => resolve(nextPage()))
    const cancel = () => {
      cancelled = true
      open = undefined
    }
    return { next, cancel }
  }

  const manifestPages: DestinationFsApi["manifestPages"] = (root, pageSize) =>
    Stream.suspend(() => {
      const walk = walkManifest(root, Math.max(1, pageSize))
      return Stream.repeatEffectOption(
        Effect.flatMap(
          Effect.tryPromise({ try: walk.next, catch: (cause) => Option.some(ioError("manifest", root, cause)) }),
          (page) => (page === undefined ? Effect.fail(Option.none()) : Effect.succeed(page))
        )
      ).pipe(Stream.ensuring(Effect.sync(walk.cancel)))
    })

  const manifest: DestinationFsApi["manifest"] = (root) => Stream.flattenIterables(manifestPages(root, 1000))

  return DestinationFs.of({
    resolveRoot,
    confine,
    openWrite,
    writeFile,
    mkdirNow,
    removeNow,
    mkdir,
    remove,
    rename,
    symlink,
    manifest,
    manifestPages
  })
}

/** Live layer; `home` defaults to `os.homedir()` (which honours `$HOME`). */
export const layer = (options?: { readonly home?: string }): Layer.Layer<DestinationFs> =>
  Layer.sync(DestinationFs, () => make({ home: options?.home ?? os.homedir() }))

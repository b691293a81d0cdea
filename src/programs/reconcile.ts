/**
 * Reconciliation ("big sync"): compare the whole local tree with a destination's manifest and
 * decide what to send and what to delete. Pure planning; the destination worker sends the plan
 * through the same queue, connection and acks as live changes (DESIGN §5).
 */
import { Data, Effect } from "effect"
import * as fsSync from "node:fs"
import * as fs from "node:fs/promises"
import type { ResolvedProject } from "../schemas/ConfigFile.js"
import type { ManifestEntry } from "../schemas/Protocol.js"
import type { Excludes } from "../services/Excludes.js"

/** One local entry as the destination would list it. */
export interface LocalEntry {
  readonly type: "file" | "dir" | "symlink"
  readonly size: number
  readonly mtime: number
  readonly mode: number
  readonly target?: string
}

export type LocalTree = ReadonlyMap<string, LocalEntry>

/** The source cannot be scanned: missing, not a directory, or unreadable. Never a reason to delete. */
export class ScanError extends Data.TaggedError("ScanError")<{ readonly root: string; readonly message: string }> {}

/** The plan would delete too much of the destination, or everything because the source is empty. */
export class UnsafeDeletion extends Data.TaggedError("UnsafeDeletion")<{ readonly message: string }> {}

// ---- scanning ---------------------------------------------------------------------------------

/**
 * Lists the project as the destination should look: excluded paths pruned (excluded directories
 * are never read), symlinks kept as links or followed per `followSymLinks` (broken ones skipped).
 */
export const scanLocal = (project: ResolvedProject, excludes: Excludes) =>
  Effect.tryPromise({
    try: async (): Promise<LocalTree> => {
      const root = project.root
      const rootStats = await fs.stat(root)
      if (!rootStats.isDirectory()) throw new Error("not a directory")
      const out = new Map<string, LocalEntry>()
      // Synchronous calls, a few microseconds each, where async ones cost a thread-pool round trip
      // per entry (22,000 entries: ≈650 ms async). The event loop gets a turn every SLICE_MS: the
      // connection being set up meanwhile (SSH handshake, daemon lookup) needs one per step.
      let sliceEnd = performance.now() + SLICE_MS
      let sinceCheck = 0
      const pending: Array<string> = [""]
      while (pending.length > 0) {
        const dirRel = pending.pop()!
        const dirAbs = dirRel === "" ? root : `${root}/${dirRel}`
        let names: Array<string>
        try {
          names = fsSync.readdirSync(dirAbs)
        } catch (e) {
          // a directory removed while scanning is the watcher's news, not a scan failure
          const code = (e as NodeJS.ErrnoException).code
          if (dirRel !== "" && (code === "ENOENT" || code === "ENOTDIR")) continue
          throw e
        }
        for (const name of names) {
          const rel = dirRel === "" ? name : `${dirRel}/${name}`
          const abs = `${dirAbs}/${name}`
          let st = fsSync.lstatSync(abs, { throwIfNoEntry: false })
          if (st === undefined) continue
          let target: string | undefined
          if (st.isSymbolicLink()) {
            if (project.followSymLinks) {
              st = statOrUndefined(abs)
              if (st === undefined) continue
            } else {
              target = readlinkOrUndefined(abs)
              if (target === undefined) continue
            }
          }
          const isDir = st.isDirectory()
          if (excludes.isExcluded(rel, isDir)) continue
          if (target !== undefined) out.set(rel, { type: "symlink", size: 0, mtime: 0, mode: 0, target })
          else if (isDir) {
            out.set(rel, { type: "dir", size: 0, mtime: st.mtimeMs, mode: st.mode & 0o7777 })
            pending.push(rel)
          } else if (st.isFile()) out.set(rel, { type: "file", size: st.size, mtime: st.mtimeMs, mode: st.mode & 0o7777 })
          // sockets, fifos and devices are not mirrored
          if (++sinceCheck >= 64) {
            sinceCheck = 0
            if (performance.now() >= sliceEnd) {
              await new Promise((resolve) => setImmediate(resolve))
              sliceEnd = performance.now() + SLICE_MS
            }
          }
        }
      }
      return out
    },
    catch: (e) => new ScanError({ root: project.root, message: (e as Error).message })
  })

/** Longest run of scanning between turns of the event loop (ms). */
const SLICE_MS = 4

const statOrUndefined = (abs: string) => {
  try {
    return fsSync.statSync(abs)
  } catch {
    return undefined
  }
}

const readlinkOrUndefined = (abs: string) => {
  try {
    return fsSync.readlinkSync(abs)
  } catch {
    return undefined
  }
}

// ---- diffing ----------------------------------------------------------------------------------

export interface ReconcilePlan {
  /** Paths to send in their current local state (new, changed, type or mode changed). */
  readonly upserts: ReadonlyArray<string>
  /** Paths gone locally; a directory's contents are implied (not listed). */
  readonly removes: ReadonlyArray<string>
  /** Bytes of the files in `upserts`. */
  readonly bytes: number
  /** Entries on the destination that take part (not excluded). */
  readonly remoteEntries: number
}

/** Same file content as far as size and mtime tell (mtimes survive the trip to the millisecond). */
const sameFile = (local: LocalEntry, remote: ManifestEntry) =>
  local.size === remote.size && Math.abs(local.mtime - remote.mtime) < 1 && local.mode === remote.mode

/** The plan that brings `remote` to `local`, which must be a `scanLocal` with the same `excludes`. */
export const diff = (
  local: LocalTree,
  remote: ReadonlyArray<ManifestEntry>,
  excludes: Excludes,
  options: { readonly noDelete: boolean }
): ReconcilePlan => {
  const remoteByPath = new Map<string, ManifestEntry>()
  for (const entry of remote) remoteByPath.set(entry.path, entry)

  const upserts: Array<string> = []
  let bytes = 0
  for (const [p, entry] of local) {
    const there = remoteByPath.get(p)
    const same =
      there !== undefined &&
      there.type === entry.type &&
      (entry.type === "file"
        ? sameFile(entry, there)
        : entry.type === "dir"
          ? there.mode === entry.mode
          : there.target === entry.target)
    if (!same) {
      upserts.push(p)
      if (entry.type === "file") bytes += entry.size
    }
  }

  // Excluded paths on the destination are not ours to delete (nor is anything below them).
  const removes: Array<string> = []
  const removedDirs = new Set<string>()
  const excludedDirs = new Set<string>()
  let remoteEntries = 0
  // An entry we have as the same type is neither excluded (the scan left it in) nor below an excluded
  // or removed directory (its parents are ours too): nearly all of them, in a no-change run.
  const rest: Array<{ readonly entry: ManifestEntry; readonly depth: number }> = []
  for (const entry of remote) {
    if (local.get(entry.path)?.type === entry.type) remoteEntries++
    else rest.push({ entry, depth: depthOf(entry.path) })
  }
  // Parents before children, so a removed or excluded parent is known first.
  rest.sort((a, b) => a.depth - b.depth)
  for (const { entry } of rest) {
    const parent = entry.path.includes("/") ? entry.path.slice(0, entry.path.lastIndexOf("/")) : ""
    if (parent !== "" && excludedDirs.has(parent)) {
      if (entry.type === "dir") excludedDirs.add(entry.path)
      continue
    }
    if (excludes.isExcluded(entry.path, entry.type === "dir")) {
      if (entry.type === "dir") excludedDirs.add(entry.path)
      continue
    }
    remoteEntries++
    if (local.has(entry.path)) continue
    if (parent !== "" && removedDirs.has(parent)) {
      if (entry.type === "dir") removedDirs.add(entry.path)
      continue
    }
    if (entry.type === "dir") removedDirs.add(entry.path)
    removes.push(entry.path)
  }

  return { upserts, removes: options.noDelete ? [] : removes, bytes, remoteEntries }
}

const depthOf = (p: string) => {
  let n = 0
  for (let i = p.indexOf("/"); i >= 0; i = p.indexOf("/", i + 1)) n++
  return n
}

export interface SafetyOptions {
  /** Refuse a plan deleting more than this share of the destination's entries… */
  readonly maxDeleteShare: number
  /** …when that is more than this many entries. */
  readonly maxDeleteFloor: number
  readonly force: boolean
}

export const defaultSafety: SafetyOptions = { maxDeleteShare: 0.5, maxDeleteFloor: 20, force: false }

/** Counts the entries a plan deletes on the destination, directories' contents included. */
export const deletedCount = (plan: ReconcilePlan, remote: ReadonlyArray<ManifestEntry>): number => {
  if (plan.removes.length === 0) return 0
  const removed = new Set(plan.removes)
  let n = 0
  for (const entry of remote) {
    let p = entry.path
    for (;;) {
      if (removed.has(p)) {
        n++
        break
      }
      const slash = p.lastIndexOf("/")
      if (slash < 0) break
      p = p.slice(0, slash)
    }
  }
  return n
}

/**
 * DESIGN §5 "Safety": an empty source facing a full destination is a vanished or unmounted
 * source, not a user who deleted everything; and a plan deleting most of a destination is refused
 * unless forced.
 */
export const checkSafety = (local: LocalTree, plan: ReconcilePlan, deleted: number, options: SafetyOptions) => {
  if (plan.removes.length === 0) return Effect.void
  if (local.size === 0) {
    return Effect.fail(
      new UnsafeDeletion({
        message: `the source is empty while the destination holds ${plan.remoteEntries} entries: refusing to delete them (is the project directory mounted and complete?)`
      })
    )
  }
  if (!options.force && deleted > options.maxDeleteFloor && deleted > options.maxDeleteShare * plan.remoteEntries) {
    return Effect.fail(
      new UnsafeDeletion({
        message: `this would delete ${deleted} of the ${plan.remoteEntries} entries on the destination (more than ${Math.round(options.maxDeleteShare * 100)} %): refusing; check the project, then run \`sicksync once --force\` to allow it`
      })
    )
  }
  return Effect.void
}

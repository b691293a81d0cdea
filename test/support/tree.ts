/**
 * Snapshots of directory trees (path, type, size, mode, content hash, link target) and their
 * differences: how tests, the demo and the benchmarks decide that two trees are identical.
 */
import { createHash } from "node:crypto"
import * as fs from "node:fs"
import * as path from "node:path"

export interface Entry {
  readonly type: "file" | "dir" | "symlink"
  readonly size: number
  readonly mode: number
  readonly hash?: string
  readonly target?: string
}

export interface SnapshotOptions {
  /** Relative paths (and everything below them) left out. */
  readonly skip?: (rel: string) => boolean
  /** Compare mtimes too (files only, to the millisecond; rounded, as utimes works in float seconds). */
  readonly mtime?: boolean
}

export const snapshot = (root: string, options: SnapshotOptions = {}): Map<string, Entry & { mtime?: number }> => {
  const out = new Map<string, Entry & { mtime?: number }>()
  const walk = (dir: string) => {
    let names: Array<string>
    try {
      names = fs.readdirSync(dir).sort()
    } catch (e) {
      if (dir !== root && (e as NodeJS.ErrnoException).code === "ENOENT") return // vanished since the lstat
      throw e
    }
    for (const name of names) {
      const abs = path.join(dir, name)
      const rel = path.relative(root, abs).split(path.sep).join("/")
      if (options.skip?.(rel)) continue
      // An entry may vanish between readdir and lstat (a temp file renamed into place): a later
      // snapshot sees the settled state.
      const st = fs.lstatSync(abs, { throwIfNoEntry: false })
      if (st === undefined) continue
      if (st.isSymbolicLink()) {
        let target: string
        try {
          target = fs.readlinkSync(abs)
        } catch {
          continue // vanished since the lstat
        }
        out.set(rel, { type: "symlink", size: 0, mode: 0, target })
      } else if (st.isDirectory()) {
        out.set(rel, { type: "dir", size: 0, mode: st.mode & 0o7777 })
        walk(abs)
      } else {
        let bytes: Buffer
        try {
          bytes = fs.readFileSync(abs)
        } catch {
          continue // vanished since the lstat
        }
        const hash = createHash("sha256").update(bytes).digest("hex")
        out.set(rel, {
          type: "file",
          size: st.size,
          mode: st.mode & 0o7777,
          hash,
          ...(options.mtime ? { mtime: Math.round(st.mtimeMs) } : {})
        })
      }
    }
  }
  walk(root)
  return out
}

/** Human-readable differences; empty when the trees are identical. */
export const diffTrees = (source: string, destination: string, options: SnapshotOptions = {}): Array<string> => {
  const a = snapshot(source, options)
  const b = snapshot(destination, options)
  const diffs: Array<string> = []
  for (const [rel, entry] of a) {
    const other = b.get(rel)
    if (other === undefined) diffs.push(`missing on destination: ${rel}`)
    else if (JSON.stringify(entry) !== JSON.stringify(other)) diffs.push(`differs: ${rel} ${JSON.stringify(entry)} vs ${JSON.stringify(other)}`)
  }
  for (const rel of b.keys()) if (!a.has(rel)) diffs.push(`extra on destination: ${rel}`)
  return diffs
}

/** Polls until the trees are identical; throws with the remaining differences after `timeoutMs`. */
export const waitForIdentical = async (
  source: string,
  destination: string,
  options: SnapshotOptions & { readonly timeoutMs?: number } = {}
): Promise<void> => {
  const deadline = Date.now() + (options.timeoutMs ?? 10_000)
  let diffs: Array<string> = []
  while (Date.now() < deadline) {
    diffs = fs.existsSync(destination) ? diffTrees(source, destination, options) : ["destination missing"]
    if (diffs.length === 0) return
    await new Promise((r) => setTimeout(r, 20))
  }
  throw new Error(`trees still differ after ${options.timeoutMs ?? 10_000} ms:\n${diffs.slice(0, 20).join("\n")}`)
}

/**
 * End to end for the `--all` requirement "one watcher per source directory even when several
 * projects or destinations use it", measured on the real CLI process (local transport, no sshd).
 *
 * Project `a` is a tree of ~40 directories; project `b` is nested in it (a/packages/b, its own
 * `.sicksync-config.json`); project `d` has a root of its own. Each has a local destination outside
 * every root. The same $HOME (registry, daemon) serves four runs in turn: `a`, `d`, `a b`, `--all`.
 *
 * Two measures of the CLI process after it is in sync:
 * - inotify watches (OS level): `inotify wd:` lines in /proc/<pid>/fdinfo of its inotify fds. The
 *   kernel keeps one watch per inode per inotify instance and libuv has one instance per loop, so
 *   this counts distinct watched inodes: it cannot tell whether chokidar shares its `fs.watch`es.
 *   (chokidar watches every file as well as every directory: `a` alone has one per entry.)
 * - `fs.watch` handles (JS level): `FSEventWrap` entries of `process.getActiveResourcesInfo()`,
 *   reported by a probe preloaded with `--import` on SIGUSR2. This is what would grow if every
 *   project's chokidar opened its own `fs.watch` per directory (chokidar 5 shares them through its
 *   module-level `FsWatchInstances`).
 *
 * (A second registry entry with the same root as `a` is not a separate project: the project file
 * has a fixed name, so both entries load the same file and the Supervisor runs it once.)
 */
import * as fs from "node:fs"
import * as path from "node:path"
import { pathToFileURL } from "node:url"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { ensureBundle, type Running, start, waitUntil } from "./support/cli.js"
import { stopDaemonOf, tempDirs, writeFile } from "./support/fixtures.js"
import { waitForIdentical } from "./support/tree.js"

const tempDir = tempDirs("sicksync-watchshare-")

const PROBE = `
import * as fs from "node:fs"
const out = process.env.SICKSYNC_WATCH_PROBE
if (out) process.on("SIGUSR2", () => {
  const fsWatch = process.getActiveResourcesInfo().filter((r) => r === "FSEventWrap").length
  fs.writeFileSync(out + ".tmp", JSON.stringify({ fsWatch, rss: process.memoryUsage().rss }))
  fs.renameSync(out + ".tmp", out)
})
`

/** Watches of every inotify instance of `pid`. */
const inotifyWatches = (pid: number): number => {
  let n = 0
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (fs.readlinkSync(`/proc/${pid}/fd/${fd}`) !== "anon_inode:inotify") continue
      n += fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, "utf8").split("\n").filter((l) => l.startsWith("inotify wd:")).length
    } catch {
      // closed meanwhile
    }
  }
  return n
}

/** Directories and files under `root` (itself included). */
const entries = (root: string): { dirs: number; files: number } => {
  let dirs = 1
  let files = 0
  for (const e of fs.readdirSync(root, { withFileTypes: true, recursive: true })) {
    if (e.isDirectory()) dirs++
    else files++
  }
  return { dirs, files }
}

const NAMES = ["a", "b", "d"] as const
type Name = (typeof NAMES)[number]

interface Measure {
  readonly inotify: number
  readonly fsWatch: number
  readonly rssMb: number
}

describe.skipIf(process.platform !== "linux")("one OS watch per source directory, however many projects use it", () => {
  let base: string
  let home: string
  let probeOut: string
  let env: Record<string, string>
  let client: Running | undefined
  const roots = {} as Record<Name, string>
  const dests = {} as Record<Name, string>
  const measured: Record<string, Measure> = {}

  const converged = (name: Name) => waitForIdentical(roots[name], dests[name], { mtime: true, timeoutMs: 30_000 })

  /** Both measures of the running client, once the inotify count has held for half a second. */
  const measure = async (what: string): Promise<Measure> => {
    const pid = client!.child.pid!
    let last = -1
    let stableSince = Date.now()
    await waitUntil(`a stable inotify watch count (${what})`, () => {
      const now = inotifyWatches(pid)
      if (now !== last) {
        last = now
        stableSince = Date.now()
      }
      return Date.now() - stableSince >= 500
    })
    fs.rmSync(probeOut, { force: true })
    process.kill(pid, "SIGUSR2")
    await waitUntil("the probe's report", () => fs.existsSync(probeOut), 10_000)
    const probe = JSON.parse(fs.readFileSync(probeOut, "utf8")) as { fsWatch: number; rss: number }
    const m = { inotify: inotifyWatches(pid), fsWatch: probe.fsWatch, rssMb: Math.round(probe.rss / 1e5) / 10 }
    measured[what] = m
    return m
  }

  /** Starts `sicksync args`, waits until every named project is in sync, and measures it (left running). */
  const runAndMeasure = async (args: ReadonlyArray<string>, names: ReadonlyArray<Name>): Promise<Measure> => {
    client = start(args, { cwd: base, home, env })
    for (const name of names) await client.waitFor(new RegExp(`^\\[${name}\\] \\[dest-${name}\\] in sync`), 30_000)
    for (const name of names) await converged(name)
    return measure(args.join(" "))
  }

  const stop = async () => {
    const c = client!
    client = undefined
    expect(await c.stop("SIGINT", 15_000)).toBe(0)
  }

  beforeAll(() => {
    ensureBundle()
    base = tempDir()
    home = path.join(base, "home")
    fs.mkdirSync(home)
    probeOut = path.join(base, "probe.json")
    const probe = writeFile(path.join(base, "probe.mjs"), PROBE)
    // The daemon the CLI starts inherits the probe too; it is harmless there (it only answers SIGUSR2).
    env = { NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ""} --import=${pathToFileURL(probe).href}`.trim(), SICKSYNC_WATCH_PROBE: probeOut }
    roots.a = path.join(base, "code", "a")
    roots.b = path.join(roots.a, "packages", "b")
    roots.d = path.join(base, "code", "d")
    for (const name of NAMES) dests[name] = path.join(base, `dest-${name}`)
    // a: src/m0..9/{,lib}, docs/d0..4, packages/b/src/s0..4/{,util}: 41 directories in all.
    for (let i = 0; i < 10; i++) {
      writeFile(path.join(roots.a, `src/m${i}/index.ts`), `export const m${i} = ${i}\n`)
      writeFile(path.join(roots.a, `src/m${i}/lib/util.ts`), `export const u${i} = ${i}\n`)
    }
    for (let i = 0; i < 5; i++) writeFile(path.join(roots.a, `docs/d${i}/README.md`), `# doc ${i}\n`)
    for (let i = 0; i < 5; i++) {
      writeFile(path.join(roots.b, `src/s${i}/main.ts`), `export const s${i} = ${i}\n`)
      writeFile(path.join(roots.b, `src/s${i}/util/helpers.ts`), `export const h${i} = ${i}\n`)
    }
    writeFile(path.join(roots.a, "README.md"), "# a\n")
    for (let i = 0; i < 4; i++) writeFile(path.join(roots.d, `lib${i}/file.txt`), `d ${i}\n`)
    for (const name of NAMES) {
      writeFile(
        path.join(roots[name], ".sicksync-config.json"),
        JSON.stringify({
          project: name,
          destinations: [{ name: `dest-${name}`, hostname: "localhost", destinationLocation: dests[name], transport: "local", websocketPort: 0 }]
        })
      )
    }
    writeFile(path.join(home, ".sicksync-config.json"), { projects: NAMES.map((name) => ({ path: roots[name], alias: name, active: true })) })
    expect(entries(roots.a).dirs).toBeGreaterThanOrEqual(40)
  }, 120_000)

  afterAll(async () => {
    await client?.stop("SIGKILL")
    await stopDaemonOf(home)
    // SICKSYNC_E2E_LOG=file keeps the measurements for a look afterwards.
    if (process.env.SICKSYNC_E2E_LOG) fs.writeFileSync(process.env.SICKSYNC_E2E_LOG, `${JSON.stringify(measured, null, 2)}\n`)
  }, 30_000)

  it("a alone, then d alone: every directory of the tree is watched", async () => {
    const a = await runAndMeasure(["a"], ["a"])
    await stop()
    const d = await runAndMeasure(["d"], ["d"])
    await stop()
    // What is measured is real: at least one watch per directory (chokidar watches files too).
    expect(a.inotify).toBeGreaterThanOrEqual(entries(roots.a).dirs)
    expect(d.inotify).toBeGreaterThanOrEqual(entries(roots.d).dirs)
    expect(a.fsWatch).toBeGreaterThanOrEqual(a.inotify)
  }, 120_000)

  it("a with b nested in it: no more watches than a alone", async () => {
    const alone = measured["a"]!
    const both = await runAndMeasure(["a", "b"], ["a", "b"])
    await stop()
    expect(both.inotify).toBe(alone.inotify)
    // chokidar shares one fs.watch per path among its instances: b's tree adds no handle. At most
    // b's config-file watch (the Supervisor's, on b's root: one inotify watch with a's) is one more.
    expect(both.fsWatch).toBeLessThanOrEqual(alone.fsWatch + 1)
  }, 120_000)

  it("--all (a, b, and d with a root of its own): exactly d's watches are added; edits in b reach a's and b's destinations", async () => {
    const a = measured["a"]!
    const d = measured["d"]!
    const all = await runAndMeasure(["--all"], NAMES)
    expect(all.inotify).toBe(a.inotify + d.inotify)
    expect(all.fsWatch).toBeLessThanOrEqual(a.fsWatch + 1 + d.fsWatch)

    // Edits in b's tree (seen by both a's and b's watchers), in a's own part and in d.
    writeFile(path.join(roots.b, "src/s0/main.ts"), "export const s0 = 'edited'\n")
    writeFile(path.join(roots.b, "src/new/deeper/added.ts"), "export const added = true\n")
    writeFile(path.join(roots.b, "src/s1/util/more.ts"), "export const more = 1\n")
    fs.rmSync(path.join(roots.b, "src/s2/main.ts"))
    writeFile(path.join(roots.a, "src/m0/index.ts"), "export const m0 = 'edited'\n")
    writeFile(path.join(roots.d, "lib0/file.txt"), "d edited\n")
    for (const name of NAMES) await converged(name)
    for (const [dest, rel] of [[dests.a, "packages/b/src"], [dests.b, "src"]] as const) {
      expect(fs.readFileSync(path.join(dest, rel, "s0/main.ts"), "utf8")).toBe("export const s0 = 'edited'\n")
      expect(fs.readFileSync(path.join(dest, rel, "new/deeper/added.ts"), "utf8")).toBe("export const added = true\n")
      expect(fs.existsSync(path.join(dest, rel, "s2/main.ts"))).toBe(false)
    }

    // What b's tree gained is watched once (one fs.watch shared by a's and b's chokidar), not twice.
    const after = await measure("--all, after the edits")
    expect(after.inotify).toBeGreaterThan(all.inotify)
    expect(after.fsWatch - all.fsWatch).toBe(after.inotify - all.inotify)
    await stop()
  }, 120_000)
})

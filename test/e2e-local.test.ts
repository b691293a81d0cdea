/**
 * End to end over the `local` transport: the real CLI bundle, a real daemon process started by it,
 * real files. After every scenario the source and each destination must be identical
 * (path, type, size, mode, content hash; file mtimes too).
 */
import * as fs from "node:fs"
import * as path from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { ensureBundle, type Running, start } from "./support/cli.js"
import { snapshot, waitForIdentical } from "./support/tree.js"
import { stopDaemonOf, tempDirs } from "./support/fixtures.js"

const tempDir = tempDirs("sicksync-e2e-")

const excluded = (rel: string) => rel === ".git" || rel.startsWith(".git/") || rel === "node_modules" || rel.startsWith("node_modules/") || rel.endsWith(".swp")
const settle = (a: string, b: string) => waitForIdentical(a, b, { skip: excluded, mtime: true, timeoutMs: 20_000 })

interface Setup {
  readonly base: string
  readonly home: string
  readonly project: string
  readonly destinations: ReadonlyArray<string>
  readonly sicksync: Running
}

const setup = async (name: string, config: Record<string, unknown>, destinations = 1): Promise<Setup> => {
  const base = tempDir()
  const home = path.join(base, "home")
  const project = path.join(base, "project")
  fs.mkdirSync(home)
  fs.mkdirSync(project)
  const dests = Array.from({ length: destinations }, (_, i) => path.join(base, `remote${i + 1}`))
  fs.writeFileSync(
    path.join(project, ".sicksync-config.json"),
    JSON.stringify({
      project: name,
      destinations: dests.map((d, i) => ({
        name: `dest${i + 1}`,
        hostname: "localhost",
        destinationLocation: d,
        transport: "local",
        websocketPort: 0
      })),
      ...config
    })
  )
  const sicksync = start([], { cwd: project, home })
  for (let i = 1; i <= destinations; i++) await sicksync.waitFor(new RegExp(`\\[dest${i}\\] connected`))
  return { base, home, project, destinations: dests, sicksync }
}

const teardown = async (s: Setup | undefined) => {
  if (s === undefined) return
  const code = await s.sicksync.stop()
  await stopDaemonOf(s.home)
  return code
}

beforeAll(() => ensureBundle(), 120_000)

describe("live sync to two local destinations", () => {
  let s: Setup
  const write = (rel: string, data: string | Buffer, mode?: number) => {
    const abs = path.join(s.project, rel)
    fs.mkdirSync(path.dirname(abs), { recursive: true })
    fs.writeFileSync(abs, data)
    if (mode !== undefined) fs.chmodSync(abs, mode)
  }
  const converged = async () => {
    for (const d of s.destinations) await settle(s.project, d)
  }

  beforeAll(async () => {
    s = await setup("two", { excludes: [".git", "node_modules/", "*.swp"] }, 2)
  }, 60_000)
  afterAll(async () => {
    expect(await teardown(s)).toBe(0)
  })

  it("creates, modifies and deletes files", async () => {
    write("a.txt", "one")
    write("b.txt", "two")
    await converged()
    write("a.txt", "one, edited")
    fs.rmSync(path.join(s.project, "b.txt"))
    await converged()
    expect(fs.readFileSync(path.join(s.destinations[0]!, "a.txt"), "utf8")).toBe("one, edited")
    expect(fs.existsSync(path.join(s.destinations[1]!, "b.txt"))).toBe(false)
  })

  it("syncs nested directories created quickly, and removes a whole tree", async () => {
    for (let i = 0; i < 10; i++) write(`deep/l1/l2/l3/n${i}/file${i}.txt`, `content ${i}`)
    await converged()
    fs.rmSync(path.join(s.project, "deep/l1/l2"), { recursive: true })
    await converged()
    expect(fs.existsSync(path.join(s.destinations[0]!, "deep/l1/l2"))).toBe(false)
    expect(fs.existsSync(path.join(s.destinations[0]!, "deep/l1"))).toBe(true)
  })

  it("renames files and directories", async () => {
    write("old/inner/x.txt", "x")
    write("name.txt", "n")
    await converged()
    fs.renameSync(path.join(s.project, "old"), path.join(s.project, "new"))
    fs.renameSync(path.join(s.project, "name.txt"), path.join(s.project, "renamed.txt"))
    await converged()
    expect(fs.existsSync(path.join(s.destinations[1]!, "new/inner/x.txt"))).toBe(true)
    expect(fs.existsSync(path.join(s.destinations[1]!, "old"))).toBe(false)
  })

  it("keeps binary content, empty files, unicode and spaces in names", async () => {
    write("bin/all-bytes.bin", Buffer.from(Array.from({ length: 256 * 4 }, (_, i) => i % 256)))
    write("bin/empty", "")
    write("ünïcødé/日本語 file.txt", "こんにちは")
    write("with space/and (parens) & more.txt", "spaces")
    await converged()
    expect(fs.readFileSync(path.join(s.destinations[0]!, "bin/all-bytes.bin"))).toEqual(
      fs.readFileSync(path.join(s.project, "bin/all-bytes.bin"))
    )
    expect(fs.statSync(path.join(s.destinations[0]!, "bin/empty")).size).toBe(0)
  })

  it("keeps the exec bit and mtimes, and follows a chmod", async () => {
    write("run.sh", "#!/bin/sh\necho hi\n", 0o755)
    const then = new Date("2020-01-02T03:04:05.678Z")
    write("dated.txt", "old")
    fs.utimesSync(path.join(s.project, "dated.txt"), then, then)
    await converged()
    expect(fs.statSync(path.join(s.destinations[0]!, "run.sh")).mode & 0o777).toBe(0o755)
    expect(Math.round(fs.statSync(path.join(s.destinations[1]!, "dated.txt")).mtimeMs)).toBe(then.getTime())
    fs.chmodSync(path.join(s.project, "run.sh"), 0o700)
    await converged()
    expect(fs.statSync(path.join(s.destinations[1]!, "run.sh")).mode & 0o777).toBe(0o700)
  })

  it("syncs a 50 MB file", async () => {
    const big = Buffer.alloc(50 * 1024 * 1024)
    for (let i = 0; i < big.length; i += 4096) big.writeUInt32LE(i, i)
    write("big/blob.bin", big)
    await converged()
    expect(fs.statSync(path.join(s.destinations[0]!, "big/blob.bin")).size).toBe(big.length)
    fs.rmSync(path.join(s.project, "big"), { recursive: true })
    await converged()
  }, 60_000)

  it("sends symlinks as links by default", async () => {
    write("target.txt", "t")
    fs.symlinkSync("target.txt", path.join(s.project, "link.txt"))
    fs.symlinkSync("../outside/nowhere", path.join(s.project, "dangling"))
    await converged()
    expect(fs.readlinkSync(path.join(s.destinations[0]!, "link.txt"))).toBe("target.txt")
    expect(fs.lstatSync(path.join(s.destinations[0]!, "dangling")).isSymbolicLink()).toBe(true)
  })

  it("never sends excluded files, and never watches inside an excluded directory", async () => {
    write("kept.txt", "kept")
    await converged()
    const watchesBefore = inotifyWatches(s.sicksync.child.pid!)
    for (let i = 0; i < 30; i++) write(`node_modules/pkg${i}/lib/index.js`, "module.exports = 1")
    write(".git/HEAD", "ref: refs/heads/main")
    write("notes.swp", "swap")
    write("kept.txt", "kept, edited") // the sentinel: an existing file, so it adds no watch
    await converged()
    for (const d of s.destinations) {
      expect(fs.existsSync(path.join(d, "node_modules"))).toBe(false)
      expect(fs.existsSync(path.join(d, ".git"))).toBe(false)
      expect(fs.existsSync(path.join(d, "notes.swp"))).toBe(false)
    }
    // 30 new directories (×2 levels) inside node_modules must not add a single watch.
    if (watchesBefore !== undefined) expect(inotifyWatches(s.sicksync.child.pid!)).toBe(watchesBefore)
  })

  it("logs each change prefixed with the project and destination", async () => {
    write("logged.txt", "x")
    await s.sicksync.waitFor(/^\[two\] \[dest1\] > change logged\.txt$/)
    await s.sicksync.waitFor(/^\[two\] \[dest2\] > change logged\.txt$/)
    await converged()
  })

  it("ends up identical after a burst of many changes", async () => {
    for (let i = 0; i < 300; i++) write(`burst/d${i % 17}/f${i}.txt`, `v1 ${i}`)
    for (let i = 0; i < 300; i += 3) write(`burst/d${i % 17}/f${i}.txt`, `v2 ${i}`)
    for (let i = 1; i < 300; i += 7) fs.rmSync(path.join(s.project, `burst/d${i % 17}/f${i}.txt`))
    await converged()
    expect(snapshot(s.destinations[1]!, { skip: excluded }).size).toBe(snapshot(s.project, { skip: excluded }).size)
  }, 60_000)
})

describe("followSymLinks: true", () => {
  let s: Setup | undefined
  afterAll(async () => {
    await teardown(s)
  })

  it("sends the content a link points to", async () => {
    s = await setup("follow", { followSymLinks: true })
    const outside = path.join(s.base, "outside")
    fs.mkdirSync(outside)
    fs.writeFileSync(path.join(outside, "shared.txt"), "shared content")
    fs.writeFileSync(path.join(s.project, "real.txt"), "real")
    fs.symlinkSync("real.txt", path.join(s.project, "alias.txt"))
    fs.symlinkSync(path.join(outside, "shared.txt"), path.join(s.project, "shared.txt"))
    const dest = s.destinations[0]!
    const deadline = Date.now() + 15_000
    while (Date.now() < deadline && !fs.existsSync(path.join(dest, "shared.txt"))) await new Promise((r) => setTimeout(r, 20))
    await new Promise((r) => setTimeout(r, 200))
    expect(fs.lstatSync(path.join(dest, "alias.txt")).isFile()).toBe(true)
    expect(fs.readFileSync(path.join(dest, "alias.txt"), "utf8")).toBe("real")
    expect(fs.lstatSync(path.join(dest, "shared.txt")).isFile()).toBe(true)
    expect(fs.readFileSync(path.join(dest, "shared.txt"), "utf8")).toBe("shared content")
  })
})

describe("stopping", () => {
  it("exits 0 on SIGTERM and on SIGINT, closing its sessions", async () => {
    for (const signal of ["SIGTERM", "SIGINT"] as const) {
      const s = await setup(`stop-${signal}`, {})
      expect(await s.sicksync.stop(signal)).toBe(0)
      const log = fs.readFileSync(path.join(s.home, ".sicksync", "logs", "daemon.log"), "utf8")
      await teardown(s)
      expect(log).toMatch(/closed/)
    }
  }, 60_000)
})

/** The number of inotify watches a process holds (Linux), or undefined where that cannot be read. */
function inotifyWatches(pid: number): number | undefined {
  try {
    let count = 0
    for (const fd of fs.readdirSync(`/proc/${pid}/fdinfo`)) {
      const info = fs.readFileSync(`/proc/${pid}/fdinfo/${fd}`, "utf8")
      count += info.split("\n").filter((l) => l.startsWith("inotify wd:")).length
    }
    return count
  } catch {
    return undefined
  }
}

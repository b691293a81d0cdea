/**
 * Reconciliation end to end over the `local` transport: `sicksync once` and the big sync that
 * every live run starts with, through the real bundle and a real daemon.
 */
import * as fs from "node:fs"
import * as path from "node:path"
import { afterEach, beforeAll, describe, expect, it } from "vitest"
import { spawnSync } from "node:child_process"
import { bundle, ensureBundle, run, type Running, start } from "./support/cli.js"
import { diffTrees, waitForIdentical } from "./support/tree.js"
import { stopDaemonOf, tempDirs } from "./support/fixtures.js"

const tempDir = tempDirs("sicksync-reconcile-")

interface World {
  readonly base: string
  readonly home: string
  readonly project: string
  readonly remote: string
}

const worlds: Array<World> = []
const running: Array<Running> = []

const world = (config: Record<string, unknown> = {}): World => {
  const base = tempDir()
  const w = { base, home: path.join(base, "home"), project: path.join(base, "project"), remote: path.join(base, "remote") }
  for (const dir of [w.home, w.project, w.remote]) fs.mkdirSync(dir)
  fs.writeFileSync(
    path.join(w.project, ".sicksync-config.json"),
    JSON.stringify({
      project: "rec",
      destinations: [{ name: "box", hostname: "localhost", destinationLocation: w.remote, transport: "local", websocketPort: 0 }],
      ...config
    })
  )
  worlds.push(w)
  return w
}

const put = (root: string, rel: string, data: string | Buffer = rel) => {
  const abs = path.join(root, rel)
  fs.mkdirSync(path.dirname(abs), { recursive: true })
  fs.writeFileSync(abs, data)
}

const once = (w: World, ...args: Array<string>) => run(["once", ...args], { cwd: w.project, home: w.home })

const identical = (w: World, skip?: (rel: string) => boolean) => diffTrees(w.project, w.remote, { mtime: true, ...(skip ? { skip } : {}) })


beforeAll(() => ensureBundle(), 120_000)
afterEach(async () => {
  for (const r of running.splice(0)) await r.stop()
  for (const w of worlds.splice(0)) await stopDaemonOf(w.home)
})

describe("sicksync once", () => {
  it("fills an empty destination, then finds nothing to do", () => {
    const w = world()
    for (let i = 0; i < 40; i++) put(w.project, `src/m${i % 4}/f${i}.ts`, `export const x = ${i}\n`)
    fs.symlinkSync("src", path.join(w.project, "link"))
    fs.chmodSync(path.join(w.project, "src/m0/f0.ts"), 0o755)
    const first = once(w)
    expect(first.stderr).toBe("")
    expect(first.code).toBe(0)
    expect(first.stdout).toMatch(/\[rec\] \[box\] reconciling: 47 to send/)
    expect(first.stdout).toMatch(/\[rec\] \[box\] in sync: sent 47/)
    expect(identical(w)).toEqual([])
    const second = once(w)
    expect(second.code).toBe(0)
    expect(second.stdout).toMatch(/\[rec\] \[box\] in sync \(\d+ entries checked/)
    expect(second.stdout).not.toMatch(/> change/)
  })

  it("updates a stale destination and deletes what is gone, but never excluded remote files", () => {
    const w = world({ excludes: ["build/", "*.log"] })
    put(w.project, "same.txt", "same")
    put(w.project, "changed.txt", "new content")
    put(w.project, "dir/kept.txt")
    expect(once(w).code).toBe(0)
    put(w.remote, "changed.txt", "old") // same name, other content and mtime
    put(w.remote, "extra/deep/file.txt")
    put(w.remote, "stray.txt")
    put(w.remote, "build/out.js", "remote-only build output")
    put(w.remote, "debug.log", "remote log")
    const r = once(w)
    expect(r.code).toBe(0)
    expect(r.stdout).toMatch(/reconciling: 1 to send .*, 2 to delete/)
    expect(identical(w, (rel) => rel === "build" || rel.startsWith("build/") || rel.endsWith(".log"))).toEqual([])
    expect(fs.readFileSync(path.join(w.remote, "build/out.js"), "utf8")).toBe("remote-only build output")
    expect(fs.existsSync(path.join(w.remote, "debug.log"))).toBe(true)
  })

  it("--no-delete keeps extra files; --dry-run prints the plan and changes nothing", () => {
    const w = world()
    put(w.project, "a.txt")
    put(w.remote, "extra.txt")
    const dry = once(w, "--dry-run")
    expect(dry.code).toBe(0)
    expect(dry.stdout).toMatch(/plan: 2 to send .*, 1 to delete/)
    expect(dry.stdout).toMatch(/send {3}a\.txt/)
    expect(dry.stdout).toMatch(/delete extra\.txt/)
    expect(fs.readdirSync(w.remote)).toEqual(["extra.txt"])
    const kept = once(w, "--no-delete")
    expect(kept.code).toBe(0)
    expect(fs.readdirSync(w.remote).sort()).toEqual([".sicksync-config.json", "a.txt", "extra.txt"])
  })

  it("refuses to empty a destination or delete most of it, unless --force", () => {
    const w = world()
    for (let i = 0; i < 30; i++) put(w.remote, `old/f${i}.txt`)
    put(w.project, "only.txt")
    const refused = once(w)
    expect(refused.code).not.toBe(0)
    expect(refused.stderr).toMatch(/\[rec\] \[box\] error: this would delete 31 of the 31 entries on the destination .* --force/)
    expect(fs.readdirSync(path.join(w.remote, "old")).length).toBe(30)
    expect(fs.existsSync(path.join(w.remote, "only.txt"))).toBe(false)
    const forced = once(w, "--force")
    expect(forced.code).toBe(0)
    expect(fs.existsSync(path.join(w.remote, "old"))).toBe(false)
  })

  it("on a terminal, a large deletion is asked about: no keeps everything, yes deletes", () => {
    const w = world()
    for (let i = 0; i < 30; i++) put(w.remote, `old/f${i}.txt`)
    put(w.project, "only.txt")
    // `script` gives the CLI a pseudo-terminal; the answer is typed once the question is up.
    const ask = (answer: string) =>
      spawnSync("sh", ["-c", `(sleep 4; printf '${answer}') | script -qec "${process.execPath} ${bundle} once" /dev/null`], {
        cwd: w.project,
        env: { ...process.env, HOME: w.home },
        encoding: "utf8",
        timeout: 60_000
      })
    const no = ask("n")
    expect(no.stdout).toMatch(/this would delete 31 of the 31 entries on the destination \(more than 50 %\)\. Delete them\?/)
    expect(no.status).not.toBe(0)
    expect(fs.readdirSync(path.join(w.remote, "old")).length).toBe(30)
    const yes = ask("y")
    expect(yes.status).toBe(0)
    expect(fs.existsSync(path.join(w.remote, "old"))).toBe(false)
    expect(fs.readFileSync(path.join(w.remote, "only.txt"), "utf8")).toBe("only.txt")
  })

  it("an empty source never empties the destination, forced or not", () => {
    // Everything the project holds is excluded, as when a mount point is empty but for its config.
    const w = world({ excludes: [".sicksync-config.json"] })
    put(w.remote, "precious.txt")
    const r = once(w, "--force")
    expect(r.code).not.toBe(0)
    expect(r.stderr).toMatch(/the source is empty while the destination holds 1 entries: refusing to delete them/)
    expect(fs.existsSync(path.join(w.remote, "precious.txt"))).toBe(true)
  })
})

describe("the big sync a live run starts with", () => {
  it("loses nothing written continuously while it runs", async () => {
    const w = world()
    // ~4,000 files, 40 MB: long enough that the writes below overlap the reconciliation.
    const blob = Buffer.alloc(10_000, 7)
    for (let i = 0; i < 4000; i++) put(w.project, `tree/d${i % 200}/f${i}.bin`, blob)
    const sicksync = start([], { cwd: w.project, home: w.home })
    running.push(sicksync)
    await sicksync.waitFor(/\[box\] connected/)
    let n = 0
    const deadline = Date.now() + 1500
    while (Date.now() < deadline) {
      put(w.project, `live/w${n % 50}.txt`, `write ${n}`)
      if (n % 7 === 0) put(w.project, `tree/d${n % 200}/f${n % 4000}.bin`, `rewritten ${n}`)
      n++
      await new Promise((r) => setTimeout(r, 2))
    }
    await waitForIdentical(w.project, w.remote, { mtime: true, timeoutMs: 60_000 })
    expect(n).toBeGreaterThan(100)
  }, 120_000)

  it("a burst of 5,000 changes converges with identical trees", async () => {
    const w = world()
    for (let i = 0; i < 2000; i++) put(w.project, `repo/p${i % 50}/f${i}.txt`, `v1 ${i}`)
    const sicksync = start([], { cwd: w.project, home: w.home })
    running.push(sicksync)
    await sicksync.waitFor(/\[box\] in sync/, 90_000)
    // a "checkout": modify 2,000, add 2,000, delete 1,000
    for (let i = 0; i < 2000; i++) put(w.project, `repo/p${i % 50}/f${i}.txt`, `v2 ${i}`)
    for (let i = 2000; i < 4000; i++) put(w.project, `repo/q${i % 40}/f${i}.txt`, `new ${i}`)
    for (let i = 0; i < 1000; i++) fs.rmSync(path.join(w.project, `repo/p${i % 50}/f${i}.txt`))
    await waitForIdentical(w.project, w.remote, { mtime: true, timeoutMs: 60_000 })
  }, 120_000)
})

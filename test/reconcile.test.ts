import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { describe, expect, it } from "vitest"
import { deletedCount, diff, type LocalEntry, scanLocal } from "../src/programs/reconcile.js"
import { tempDirs, testProject } from "./support/fixtures.js"
import type { ManifestEntry } from "../src/schemas/Protocol.js"
import { fromPatterns, none } from "../src/services/Excludes.js"

const tmp = tempDirs("sicksync-scan-")

const file = (size: number, mtime: number, mode = 0o644): LocalEntry => ({ type: "file", size, mtime, mode })
const dir = (mode = 0o755): LocalEntry => ({ type: "dir", size: 0, mtime: 0, mode })
const m = (p: string, e: LocalEntry): ManifestEntry => ({ path: p, ...e })

describe("diff", () => {
  it("decides by type, size, mtime (to the millisecond), mode and link target", () => {
    const local = new Map<string, LocalEntry>([
      ["same", file(3, 1000.4)],
      ["bigger", file(4, 1000)],
      ["newer", file(3, 2000)],
      ["chmod", file(3, 1000, 0o755)],
      ["was-dir", file(3, 1000)],
      ["d", dir(0o700)],
      ["link", { type: "symlink", size: 0, mtime: 0, mode: 0, target: "b" }],
      ["new", file(10, 1)]
    ])
    const remote = [
      m("same", file(3, 1000.9)),
      m("bigger", file(3, 1000)),
      m("newer", file(3, 1000)),
      m("chmod", file(3, 1000)),
      m("was-dir", dir()),
      m("was-dir/inner", file(1, 1)),
      m("d", dir(0o755)),
      m("link", { type: "symlink", size: 0, mtime: 0, mode: 0, target: "a" })
    ]
    const plan = diff(local, remote, none, { noDelete: false })
    expect([...plan.upserts].sort()).toEqual(["bigger", "chmod", "d", "link", "new", "newer", "was-dir"])
    expect(plan.removes).toEqual(["was-dir/inner"])
    expect(plan.bytes).toBe(4 + 3 + 3 + 3 + 10)
  })

  it("removes the top of a gone tree only, never excluded paths, and nothing with noDelete", () => {
    const remote = [
      m("gone", dir()),
      m("gone/a", dir()),
      m("gone/a/b", file(1, 1)),
      m("node_modules", dir()),
      m("node_modules/x", file(1, 1)),
      m("keep.log", file(1, 1))
    ]
    const excludes = fromPatterns(["node_modules/", "*.log"])
    const plan = diff(new Map(), remote, excludes, { noDelete: false })
    expect(plan.removes).toEqual(["gone"])
    expect(plan.remoteEntries).toBe(3)
    expect(deletedCount(plan, remote)).toBe(3)
    expect(diff(new Map(), remote, excludes, { noDelete: true }).removes).toEqual([])
  })

  it("decides the same whatever order the destination lists its entries in", () => {
    const local = new Map<string, LocalEntry>([
      ["src", dir()],
      ["src/a.ts", file(1, 1)],
      ["src/gen", file(1, 1)],
      ["build", file(2, 2)]
    ])
    // children before their parents; `build` is a directory there (excluded as one), a file here
    const remote = [
      m("src/old/deep/x", file(1, 1)),
      m("src/a.ts", file(1, 1)),
      m("build/out.js", file(1, 1)),
      m("src/old/deep", dir()),
      m("src/gen/y", file(1, 1)),
      m("src/old", dir()),
      m("cache/z", file(1, 1)),
      m("src/gen", dir()),
      m("build", dir()),
      m("cache", dir()),
      m("src", dir())
    ]
    const excludes = fromPatterns(["build/", "cache"])
    const plan = diff(local, remote, excludes, { noDelete: false })
    expect(plan.removes).toEqual(["src/old", "src/gen/y"])
    expect([...plan.upserts].sort()).toEqual(["build", "src/gen"])
    // src, src/a.ts, src/gen (replaced), src/gen/y, src/old and below
    expect(plan.remoteEntries).toBe(7)
    expect(diff(local, [...remote].reverse(), excludes, { noDelete: false })).toEqual(plan)
  })
})

describe("scanLocal", () => {
  it("prunes excluded directories and keeps links as links unless following", async () => {
    const root = tmp()
    fs.mkdirSync(path.join(root, "node_modules/pkg"), { recursive: true })
    fs.writeFileSync(path.join(root, "node_modules/pkg/index.js"), "x")
    fs.writeFileSync(path.join(root, "a.txt"), "abc")
    fs.symlinkSync("a.txt", path.join(root, "link"))
    fs.symlinkSync("missing", path.join(root, "dangling"))
    const project = (followSymLinks: boolean) => testProject(root, { followSymLinks })
    const links = await Effect.runPromise(scanLocal(project(false), fromPatterns(["node_modules/"])))
    expect([...links.keys()].sort()).toEqual(["a.txt", "dangling", "link"])
    expect(links.get("link")).toMatchObject({ type: "symlink", target: "a.txt" })
    const followed = await Effect.runPromise(scanLocal(project(true), fromPatterns(["node_modules/"])))
    expect([...followed.keys()].sort()).toEqual(["a.txt", "link"])
    expect(followed.get("link")).toMatchObject({ type: "file", size: 3 })
    const missing = await Effect.runPromise(Effect.flip(scanLocal({ ...project(false), root: path.join(root, "nope") }, none)))
    expect(missing._tag).toBe("ScanError")
  })
})

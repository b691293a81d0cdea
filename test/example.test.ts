/** The README's library example is examples/memory-mirror.ts, verbatim, and it works. */
import { Effect } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { describe, expect, it } from "vitest"
import { mirrorIntoMemory } from "../examples/memory-mirror.js"
import { tempDirs } from "./support/fixtures.js"

const root = path.resolve(import.meta.dirname, "..")
const tmp = tempDirs("sicksync-example-")

const until = async (check: () => boolean, what: string) => {
  const deadline = Date.now() + 10_000
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

describe("the library example", () => {
  it("is quoted verbatim in the README", () => {
    const example = fs.readFileSync(path.join(root, "examples/memory-mirror.ts"), "utf8").trim()
    expect(fs.readFileSync(path.join(root, "README.md"), "utf8")).toContain(example)
  })

  it("mirrors a project, then its edits, into memory", async () => {
    const project = tmp()
    fs.writeFileSync(
      path.join(project, ".sicksync-config.json"),
      JSON.stringify({ destinations: [{ name: "mem", hostname: "nowhere", destinationLocation: "/srv/app" }] })
    )
    fs.writeFileSync(path.join(project, "a.txt"), "before")
    const { stop, trees } = await Effect.runPromise(mirrorIntoMemory(path.join(project, ".sicksync-config.json")))
    try {
      await until(() => trees.get("mem")?.get("a.txt")?.content?.toString() === "before", "the big sync")
      fs.writeFileSync(path.join(project, "a.txt"), "after")
      fs.mkdirSync(path.join(project, "dir"))
      fs.writeFileSync(path.join(project, "dir/b.txt"), "new")
      await until(
        () => trees.get("mem")?.get("a.txt")?.content?.toString() === "after" && trees.get("mem")?.get("dir/b.txt")?.content?.toString() === "new",
        "the live edits"
      )
    } finally {
      await Effect.runPromise(stop)
    }
  })

  it("the built library exports what the example uses", async () => {
    const built = path.join(root, "dist/index.mjs")
    if (!fs.existsSync(built)) return expect.fail("dist/index.mjs is missing: run `npm run build`")
    const lib = (await import(built)) as Record<string, unknown>
    for (const name of ["Config", "Progress", "RemoteConnection", "syncProject", "Watcher", "Supervisor", "layer", "reconcileOnce"]) {
      expect(lib[name], name).toBeDefined()
    }
  })
})

import * as NodeContext from "@effect/platform-node/NodeContext"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Fiber, Layer, Logger } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import type { ResolvedProject } from "../src/schemas/ConfigFile.js"
import * as Config from "../src/services/Config.js"
import { describe as table, layer as SupervisorLive, Supervisor } from "../src/services/Supervisor.js"
import * as Watcher from "../src/services/Watcher.js"
import { fakeRemote } from "./support/fakeRemote.js"
import { tempDirs } from "./support/fixtures.js"

const base = tempDirs("sicksync-supervisor-")

const writeProject = (root: string, name: string, extra: Record<string, unknown> = {}) => {
  fs.mkdirSync(root, { recursive: true })
  fs.writeFileSync(
    path.join(root, ".sicksync-config.json"),
    JSON.stringify({
      project: name,
      destinations: [{ name: `${name}-box`, hostname: "localhost", destinationLocation: `/tmp/${name}`, transport: "local" }],
      ...extra
    })
  )
}

const eventually = <A>(check: () => A | undefined | false, what: string) =>
  Effect.gen(function* () {
    const deadline = Date.now() + 10_000
    for (;;) {
      const value = check()
      if (value !== undefined && value !== false) return value
      if (Date.now() > deadline) return yield* Effect.dieMessage(`timed out waiting for ${what}`)
      yield* Effect.sleep("10 millis")
    }
  })

/** Runs the supervisor over real projects on disk with a recording remote; returns the log lines. */
const harness = Effect.gen(function* () {
  const home = base()
  const remote = yield* fakeRemote
  const logs: Array<string> = []
  const logger = Logger.make(({ annotations, message }) => {
    const project = annotations.pipe((a) => [...a].find(([k]) => k === "project")?.[1])
    logs.push(`[${String(project ?? "")}] ${Array.isArray(message) ? message.join(" ") : String(message)}`)
  })
  const layer = SupervisorLive.pipe(
    Layer.provideMerge(Layer.mergeAll(Config.layer({ home }).pipe(Layer.provide(NodeContext.layer)), Watcher.layer, remote.layer)),
    Layer.provideMerge(Logger.replace(Logger.defaultLogger, logger))
  )
  const load = (root: string) =>
    Effect.flatMap(Config.SyncConfig, (c) => c.loadProject(path.join(root, ".sicksync-config.json"))).pipe(Effect.provide(layer))
  return { home, remote, logs, layer, load }
})

describe("Supervisor", () => {
  it("prints a table of projects and destinations", () => {
    const project = (name: string): ResolvedProject => ({
      name,
      alias: undefined,
      root: `/src/${name}`,
      configFile: `/src/${name}/.sicksync-config.json`,
      destinations: [
        { name: "box1", hostname: "box1", destinationLocation: `/srv/${name}`, username: "me", port: undefined, identityFile: undefined, websocketPort: 8675, transport: "ssh" }
      ],
      excludes: [],
      excludesFile: [],
      followSymLinks: false
    })
    expect(table([project("web"), project("api")]).split("\n")).toEqual([
      "PROJECT  DESTINATION  HOST     PATH",
      "web      box1         me@box1  /srv/web",
      "api      box1         me@box1  /srv/api"
    ])
  })

  it.live("a failing project is restarted with backoff while the others keep syncing, and recovers", () =>
    Effect.gen(function* () {
      const h = yield* harness
      const dir = base()
      const good = path.join(dir, "good")
      const bad = path.join(dir, "bad")
      writeProject(good, "good")
      writeProject(bad, "bad")
      const projects = [yield* h.load(good), yield* h.load(bad)]
      fs.rmSync(bad, { recursive: true }) // its root vanishes before the start
      h.remote.manifests.set("bad-box", []) // an empty destination: the big sync sends everything

      const fiber = yield* Effect.flatMap(Supervisor, (s) =>
        s.run(projects, { restartBase: "20 millis", restartCap: "100 millis" })
      ).pipe(Effect.provide(h.layer), Effect.fork)
      yield* eventually(() => h.logs.filter((l) => l.startsWith("[bad] stopped:") && l.includes("restarting in")).length >= 2, "restarts")
      yield* eventually(() => h.logs.some((l) => l.startsWith("[good]") && l.includes("in sync")), "good in sync")
      fs.writeFileSync(path.join(good, "edit.txt"), "still syncing")
      yield* eventually(() => h.remote.applied.get("good-box")?.includes("Write edit.txt still syncing"), "good keeps syncing")

      writeProject(bad, "bad") // back: the next restart picks it up
      fs.writeFileSync(path.join(bad, "back.txt"), "back")
      yield* eventually(() => h.remote.applied.get("bad-box")?.includes("Write back.txt back"), "bad recovered")
      yield* Fiber.interrupt(fiber)
    })
  )

  it.live("an edited config restarts that project alone; a broken edit keeps the last good config", () =>
    Effect.gen(function* () {
      const h = yield* harness
      const dir = base()
      const one = path.join(dir, "one")
      const two = path.join(dir, "two")
      writeProject(one, "one")
      writeProject(two, "two")
      const projects = [yield* h.load(one), yield* h.load(two)]
      h.remote.manifests.set("one-box", []) // an empty destination: every big sync sends everything
      const fiber = yield* Effect.flatMap(Supervisor, (s) => s.run(projects, { reloadQuiet: "50 millis" })).pipe(
        Effect.provide(h.layer),
        Effect.fork
      )
      yield* eventually(() => h.logs.filter((l) => l.includes("in sync")).length >= 2, "both in sync")

      writeProject(one, "one", { excludes: ["*.tmp"] })
      yield* eventually(() => h.logs.some((l) => l.startsWith("[one]") && l.includes("changed: restarting with the new settings")), "reload")
      fs.writeFileSync(path.join(one, "scratch.tmp"), "excluded now")
      fs.writeFileSync(path.join(one, "kept.txt"), "kept")
      yield* eventually(() => h.remote.applied.get("one-box")?.includes("Write kept.txt kept"), "one syncs with the new config")
      expect(h.remote.applied.get("one-box")?.some((op) => op.includes("scratch.tmp"))).toBe(false)
      expect(h.logs.some((l) => l.startsWith("[two]") && l.includes("restarting"))).toBe(false)

      fs.writeFileSync(path.join(one, ".sicksync-config.json"), '{ "destinations": [ }')
      yield* eventually(() => h.logs.some((l) => l.startsWith("[one]") && l.includes("keeping the last good config")), "broken edit reported")
      fs.writeFileSync(path.join(one, "after.txt"), "after")
      yield* eventually(() => h.remote.applied.get("one-box")?.includes("Write after.txt after"), "one still syncing")
      yield* Fiber.interrupt(fiber)
    })
  )
})

describe("Supervisor with a legacy ~/.sicksync/config.json", () => {
  it.live("runs every project of the one legacy file, and reloads the one whose entry changed", () =>
    Effect.gen(function* () {
      const h = yield* harness
      const a = path.join(h.home, "code", "a")
      const b = path.join(h.home, "code", "b")
      for (const root of [a, b]) fs.mkdirSync(root, { recursive: true })
      const legacyFile = path.join(h.home, ".sicksync", "config.json")
      const legacy = (bExcludes: ReadonlyArray<string>) =>
        JSON.stringify({
          projects: [
            { project: "a", hostname: "ha", sourceLocation: "~/code/a", destinationLocation: "/srv/a" },
            { project: "b", hostname: "hb", sourceLocation: b, destinationLocation: "/srv/b", excludes: bExcludes }
          ]
        })
      fs.mkdirSync(path.dirname(legacyFile), { recursive: true })
      fs.writeFileSync(legacyFile, legacy([]))
      const projects = yield* Effect.flatMap(Config.SyncConfig, (c) => c.resolve({ aliases: [], all: true, global: false, cwd: h.home })).pipe(
        Effect.provide(h.layer)
      )
      expect(projects.map((p) => [p.name, p.configFile])).toEqual([["a", legacyFile], ["b", legacyFile]])
      const fiber = yield* Effect.flatMap(Supervisor, (s) => s.run(projects, { reloadQuiet: "50 millis" })).pipe(
        Effect.provide(h.layer),
        Effect.fork
      )
      yield* eventually(() => h.logs.some((l) => l.startsWith("[a]") && l.includes("in sync")), "a in sync")
      yield* eventually(() => h.logs.some((l) => l.startsWith("[b]") && l.includes("in sync")), "b in sync")
      fs.writeFileSync(path.join(a, "one.txt"), "in a")
      fs.writeFileSync(path.join(b, "two.txt"), "in b")
      yield* eventually(() => h.remote.applied.get("ha")?.includes("Write one.txt in a"), "a syncs")
      yield* eventually(() => h.remote.applied.get("hb")?.includes("Write two.txt in b"), "b syncs")

      const bInSync = () => h.logs.filter((l) => l.startsWith("[b]") && l.includes("in sync")).length
      const before = bInSync()
      fs.writeFileSync(legacyFile, legacy(["*.tmp"]))
      yield* eventually(() => h.logs.some((l) => l.startsWith("[b]") && l.includes("changed: restarting with the new settings")), "b reloaded")
      // the fake remote lists the local tree as it is: edits are only seen once b watches again
      yield* eventually(() => bInSync() > before, "b running on its new config")
      fs.writeFileSync(path.join(b, "scratch.tmp"), "excluded now")
      fs.writeFileSync(path.join(b, "kept.txt"), "kept")
      fs.writeFileSync(path.join(a, "still.txt"), "still")
      yield* eventually(() => h.remote.applied.get("hb")?.includes("Write kept.txt kept"), "b syncs with its new config")
      yield* eventually(() => h.remote.applied.get("ha")?.includes("Write still.txt still"), "a still syncing")
      expect(h.remote.applied.get("hb")?.some((op) => op.includes("scratch.tmp"))).toBe(false)
      expect(h.logs.some((l) => l.startsWith("[a]") && l.includes("restarting"))).toBe(false)
      expect(h.logs.some((l) => l.includes("keeping the last good config"))).toBe(false)
      yield* Fiber.interrupt(fiber)
    })
  )
})

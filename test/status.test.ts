import { describe, expect, it } from "@effect/vitest"
import { Effect, Exit, Layer, Scope } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { makeDestinationWorker, makeScanner, defaultSyncOptions } from "../src/programs/syncProject.js"
import { tempDirs, testDestination, testProject } from "./support/fixtures.js"
import { none } from "../src/services/Excludes.js"
import { type DestinationState, describeState, render, Status } from "../src/services/Status.js"
import { fakeRemote } from "./support/fakeRemote.js"

const tmp = tempDirs("sicksync-status-")

/** A live destination worker on a fake remote, run in `scope`, every status it sets (and its removal) given to `record`. */
const startRecorded = (
  remote: Effect.Effect.Success<typeof fakeRemote>,
  scope: Scope.Scope,
  record: (state: DestinationState | "removed") => void
) =>
  Effect.gen(function* () {
    const root = tmp()
    const project = testProject(root)
    const recording = Layer.succeed(
      Status,
      Status.of({
        set: (_p, _d, state) => Effect.sync(() => record(state)),
        remove: () => Effect.sync(() => record("removed")),
        line: () => undefined
      })
    )
    const worker = yield* makeScanner(project, none).pipe(
      Effect.flatMap((scanner) => makeDestinationWorker(project, testDestination("d"), none, scanner, { ...defaultSyncOptions, settle: "5 millis" })),
      Effect.provide(Layer.merge(remote.layer, recording))
    )
    yield* Effect.forkIn(worker.run, scope)
    return { root, worker }
  })

describe("Status", () => {
  it("renders one compact line, cut to the terminal's width", () => {
    const states = new Map<string, DestinationState>([
      ["webapp → devbox1", { _tag: "inSync" }],
      ["api → devbox2", { _tag: "syncing", files: 12 }],
      ["docs → box3", { _tag: "offline", retryInMs: 3600 }],
      ["www → box4", { _tag: "failing", failed: 2 }]
    ])
    expect(render(states, 200)).toBe(
      "webapp → devbox1 in sync · api → devbox2 syncing 12 · docs → box3 offline, retry in 4s · www → box4 2 failed"
    )
    expect(render(states, 20)).toBe("webapp → devbox1 in…")
  })

  it.live("a worker reports connecting, comparing, syncing and in sync, and leaves the line when it ends", () =>
    Effect.gen(function* () {
      const seen: Array<string> = []
      const remote = yield* fakeRemote
      const scope = yield* Scope.make()
      const { root, worker } = yield* startRecorded(remote, scope, (state) => seen.push(state === "removed" ? state : state._tag))
      while (!seen.includes("inSync")) yield* Effect.sleep("5 millis")
      fs.writeFileSync(path.join(root, "f"), "x")
      yield* worker.offer([{ path: "f", kind: "upsert" }])
      while (seen.filter((s) => s === "inSync").length < 2) yield* Effect.sleep("5 millis")
      yield* Scope.close(scope, Exit.void)
      yield* Effect.sleep("10 millis")
      expect(seen).toEqual(["connecting", "reconciling", "inSync", "syncing", "inSync", "removed"])
    })
  )

  it.live("a change that failed keeps the line off 'in sync' until that path is sent, or removed with its directory", () =>
    Effect.gen(function* () {
      const seen: Array<string> = []
      const remote = yield* fakeRemote
      remote.refuse.set("d f", [{ code: "io", message: "write /r/.f.tmp: ENOSPC: no space left on device, write" }])
      const scope = yield* Scope.make()
      const { root, worker } = yield* startRecorded(remote, scope, (state) => state !== "removed" && seen.push(describeState(state)))
      const settled = (n: number) =>
        Effect.gen(function* () {
          while (seen.filter((s) => s === "in sync" || s.endsWith(" failed")).length < n) yield* Effect.sleep("5 millis")
        })
      yield* settled(1)
      fs.writeFileSync(path.join(root, "f"), "x")
      yield* worker.offer([{ path: "f", kind: "upsert" }])
      yield* settled(2)
      fs.writeFileSync(path.join(root, "g"), "y")
      yield* worker.offer([{ path: "g", kind: "upsert" }])
      yield* settled(3)
      fs.writeFileSync(path.join(root, "f"), "xx")
      yield* worker.offer([{ path: "f", kind: "upsert" }])
      yield* settled(4)
      // a file that failed in a directory removed since is no longer a failure
      fs.mkdirSync(path.join(root, "d"))
      fs.writeFileSync(path.join(root, "d", "x"), "z")
      remote.refuse.set("d d/x", [{ code: "io", message: "write /r/d/.x.tmp: ENOSPC: no space left on device, write" }])
      yield* worker.offer([{ path: "d", kind: "upsert" }, { path: "d/x", kind: "upsert" }])
      yield* settled(5)
      fs.rmSync(path.join(root, "d"), { recursive: true })
      yield* worker.offer([{ path: "d", kind: "remove" }])
      yield* settled(6)
      yield* Scope.close(scope, Exit.void)
      expect(seen.filter((s) => s === "in sync" || s.endsWith(" failed"))).toEqual([
        "in sync",
        "1 failed",
        "1 failed",
        "in sync",
        "1 failed",
        "in sync"
      ])
    })
  )
})

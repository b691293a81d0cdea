// Mirror a project into memory with sicksync's own engine: the same watcher, big sync and live
// path as the CLI, with the remote side replaced by an in-memory test layer.
import * as NodeContext from "@effect/platform-node/NodeContext"
import { Effect, Fiber, Layer } from "effect"
import { Config, Progress, RemoteConnection, Status, syncProject, Watcher } from "sicksync"

export const mirrorIntoMemory = (configFile: string) =>
  Effect.gen(function* () {
    const memory = RemoteConnection.makeMemory()
    const layer = Layer.mergeAll(Config.layer(), Watcher.layer, Progress.layerNone, Status.layerNone, memory.layer).pipe(
      Layer.provideMerge(NodeContext.layer)
    )
    const project = yield* Effect.flatMap(Config.SyncConfig, (config) => config.loadProject(configFile)).pipe(
      Effect.provide(layer)
    )
    // Runs until `stop`: a big sync of each destination, then every change as it happens. A daemon
    // fiber, as it outlives this effect (a plain fork would end with it).
    const fiber = yield* Effect.forkDaemon(syncProject(project).pipe(Effect.provide(layer)))
    return { trees: memory.trees, stop: Fiber.interrupt(fiber) }
  })

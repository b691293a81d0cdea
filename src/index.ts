/**
 * sicksync as a library: the services, the programs and one composed Layer, for Effect programs
 * that run `syncProject`, a reconciliation or the supervisor with layers of their own (e.g. a
 * test double for the remote side).
 */
import * as NodeContext from "@effect/platform-node/NodeContext"
import { Layer } from "effect"
import * as Bootstrapper from "./services/Bootstrapper.js"
import * as Config from "./services/Config.js"
import * as DaemonLocator from "./services/DaemonLocator.js"
import * as Logging from "./services/Logging.js"
import * as Progress from "./services/Progress.js"
import * as RemoteConnection from "./services/RemoteConnection.js"
import * as Status from "./services/Status.js"
import * as Supervisor from "./services/Supervisor.js"
import * as Watcher from "./services/Watcher.js"

export * as ConfigFile from "./schemas/ConfigFile.js"
export * as FileEvent from "./schemas/FileEvent.js"
export * as Protocol from "./schemas/Protocol.js"
export * as Excludes from "./services/Excludes.js"
export { Bootstrapper, Config, DaemonLocator, Logging, Progress, RemoteConnection, Status, Supervisor, Watcher }
export { reconcileOnce, syncProject, defaultSyncOptions, type SyncOptions, DestinationHalted } from "./programs/syncProject.js"
export { diff, scanLocal, type ReconcilePlan } from "./programs/reconcile.js"
export { coalesce } from "./programs/coalesce.js"

export interface LiveOptions {
  /** How to run sicksync itself (for starting daemons, and the agent uploaded over SSH): `[node, sicksync.mjs]`. */
  readonly command: ReadonlyArray<string>
  /** Whose config and local daemon: defaults to the current user's home. */
  readonly home?: string
}

/**
 * Everything the CLI runs with, minus the logger: config, watcher, remote sessions over the local
 * and SSH transports, progress bars and the supervisor. Replace any part with `Layer.provide`.
 */
export const layer = (options: LiveOptions) => {
  const locator = DaemonLocator.layer({ command: options.command, ...(options.home !== undefined ? { home: options.home } : {}) }).pipe(
    Layer.provide(Bootstrapper.layer({ agentBundle: options.command[options.command.length - 1]! }))
  )
  const remote = RemoteConnection.layer().pipe(Layer.provide(locator))
  return Supervisor.layer.pipe(
    Layer.provideMerge(
      Layer.mergeAll(
        Config.layer(options.home !== undefined ? { home: options.home } : {}),
        Watcher.layer,
        Progress.layerNone,
        remote
      )
    ),
    Layer.provideMerge(Status.layerNone),
    Layer.provideMerge(NodeContext.layer)
  )
}

#!/usr/bin/env node
/**
 * The sicksync CLI (also what runs on a remote as the daemon). Errors a user can act on are
 * printed once, without a stack trace; anything else is a bug and printed in full.
 */
import * as ValidationError from "@effect/cli/ValidationError"
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { Cause, Effect, Layer, Logger, LogLevel, Option } from "effect"
import { cli } from "../programs/cli.js"
import * as Bootstrapper from "../services/Bootstrapper.js"
import * as Config from "../services/Config.js"
import * as DaemonLocator from "../services/DaemonLocator.js"
import * as Logging from "../services/Logging.js"
import * as Progress from "../services/Progress.js"
import * as RemoteConnection from "../services/RemoteConnection.js"
import * as Status from "../services/Status.js"
import * as Supervisor from "../services/Supervisor.js"
import * as Watcher from "../services/Watcher.js"

const self = DaemonLocator.selfCommand()
// The SSH transport installs this very bundle on remotes that lack it.
const LocatorLive = DaemonLocator.layer({ command: self }).pipe(Layer.provide(Bootstrapper.layer({ agentBundle: self[1]! })))
const RemoteLive = RemoteConnection.layer().pipe(Layer.provide(LocatorLive))

const MainLive = Supervisor.layer.pipe(
  Layer.provideMerge(Layer.mergeAll(Config.layer(), Logging.layer, Watcher.layer, Progress.layer, RemoteLive)),
  Layer.provideMerge(Status.layer),
  Layer.provideMerge(NodeContext.layer)
)

/** Tagged errors a user caused and can fix: shown as their message alone. */
const userFacing = new Set([
  "ConfigError",
  "ProjectNotFound",
  "RegistryConflict",
  "UsageError",
  "WatchError",
  "ExcludesFileError",
  "DaemonAlreadyRunning",
  "OnceFailed",
  "StartDaemonError"
])

const report = (cause: Cause.Cause<unknown>) =>
  Effect.sync(() => {
    if (Cause.isInterruptedOnly(cause)) return
    const failure = Cause.failureOption(cause)
    if (Option.isSome(failure)) {
      const error = failure.value
      if (ValidationError.isValidationError(error)) return // @effect/cli has printed it
      if (typeof error === "object" && error !== null && "_tag" in error && userFacing.has(String(error._tag))) {
        process.stderr.write(`error: ${(error as unknown as { message: string }).message}\n`)
        return
      }
    }
    process.stderr.write(`error: ${Cause.pretty(cause)}\n`)
  })

cli(process.argv).pipe(
  Effect.tapErrorCause(report),
  Effect.provide(MainLive),
  Logger.withMinimumLogLevel(LogLevel.Info),
  // No pretty logger: it would print every warning a second time, on stdout (breaking `info --json`).
  NodeRuntime.runMain({ disableErrorReporting: true, disablePrettyLogger: true })
)

#!/usr/bin/env node
/**
 * The sicksync CLI (also what runs on a remote as the daemon). Errors a user can act on are
 * printed once, without a stack trace; anything else is a bug and printed in full.
 */
import * as ValidationError from "@effect/cli/ValidationError"
import * as NodeContext from "@effect/platform-node/NodeContext"
import * as NodeRuntime from "@effect/platform-node/NodeRuntime"
import { defaultTeardown, type Teardown } from "@effect/platform/Runtime"
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

/**
 * Exits, with runMain's exit code, as soon as the program is done and its output written: left to
 * itself, Node would first wait for the SSH socket to close and then free the whole heap (~30 ms
 * after a no-change sync of 20,000 files, more after a big one). runMain's own exit is not used: on
 * an error or a signal it exits at once, possibly before the report is out.
 */
const exitWhenDone: Teardown = (exit) =>
  defaultTeardown(exit, (code) => {
    let pending = 2
    const done = () => {
      if (--pending === 0) process.exit(code)
    }
    // An empty write calls back once everything written before it is out (or the stream is gone).
    for (const stream of [process.stdout, process.stderr]) {
      if (stream.destroyed || !stream.writable) done()
      else stream.write("", done)
    }
  })

cli(process.argv).pipe(
  Effect.tapErrorCause(report),
  Effect.provide(MainLive),
  Logger.withMinimumLogLevel(LogLevel.Info),
  // No pretty logger: it would print every warning a second time, on stdout (breaking `info --json`).
  NodeRuntime.runMain({ disableErrorReporting: true, disablePrettyLogger: true, teardown: exitWhenDone })
)

/**
 * `sicksync daemon` and `sicksync start-daemon`. The lead adds both to the root command with
 * `Command.withSubcommands`; they need no service from the main layer.
 */
import * as Command from "@effect/cli/Command"
import * as Options from "@effect/cli/Options"
import { Effect, FiberRef, HashSet, Logger, Option, Schema } from "effect"
import * as DestinationFs from "../services/DestinationFs.js"
import { DAEMON_NODE_FLAGS, DEFAULT_GRACE_MS, DEFAULT_PORT, runDaemon } from "./daemon.js"
import { startDaemonAndPrint } from "./startDaemon.js"

const port = Options.integer("port").pipe(
  Options.withSchema(Schema.Int.pipe(Schema.between(0, 65535))),
  Options.withDefault(DEFAULT_PORT),
  Options.withDescription("port on 127.0.0.1 (0 = any free port)")
)
const graceMs = Options.integer("grace-ms").pipe(
  Options.withSchema(Schema.Int.pipe(Schema.nonNegative())),
  Options.withDefault(DEFAULT_GRACE_MS),
  Options.withDescription("how long to stay up without clients (ms)")
)
const readyFd = Options.integer("ready-fd").pipe(
  Options.withSchema(Schema.Int.pipe(Schema.greaterThanOrEqualTo(3))),
  Options.optional,
  Options.withDescription("write one JSON ready line to this file descriptor once listening (used by start-daemon)")
)

/** One line per entry on stderr (the daemon's stdout and stderr both go to ~/.sicksync/logs/daemon.log). */
export const daemonLogger = Logger.make(({ logLevel, message }) => {
  const text = Array.isArray(message) ? message.map(String).join(" ") : String(message)
  process.stderr.write(`${new Date().toISOString()} ${logLevel.label} ${text.replace(/\n/g, " ")}\n`)
})

/** `sicksync daemon [--port N] [--grace-ms N] [--ready-fd N]`: run the daemon in the foreground. */
export const daemonCommand = Command.make("daemon", { port, graceMs, readyFd }, (options) =>
  runDaemon({
    port: options.port,
    graceMs: options.graceMs,
    readyFd: Option.getOrUndefined(options.readyFd),
    handleSignals: true
  }).pipe(
    Effect.provide(DestinationFs.layer()),
    Effect.locally(FiberRef.currentLoggers, HashSet.make(daemonLogger))
  )).pipe(Command.withDescription("Run the remote daemon (normally started by start-daemon)"))

/** `sicksync start-daemon [--port N] [--grace-ms N]`: start this user's daemon if needed, print one ReadyLine. */
export const startDaemonCommand = Command.make("start-daemon", { port, graceMs }, (options) =>
  startDaemonAndPrint({
    command: [process.execPath, ...DAEMON_NODE_FLAGS, process.argv[1] ?? "sicksync"],
    port: options.port,
    graceMs: options.graceMs
  })).pipe(Command.withDescription("Start the daemon detached unless one runs; print its ready line as JSON"))

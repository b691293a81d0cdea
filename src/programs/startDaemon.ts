/**
 * `sicksync start-daemon`: make sure this user's daemon runs, then print one `ReadyLine` JSON line.
 *
 * Runs on a remote over SSH exec (and locally for the `local` transport). If a daemon answers
 * (state file, live pid, TCP connect) it is reported with `started: false`. Otherwise the daemon is
 * spawned detached with its output appended to `~/.sicksync/logs/daemon.log`; it writes one
 * `ReadySignal` line on fd 3 once it listens (or why it could not start). When two start-daemons race,
 * the daemon that loses the lock says so and its start-daemon waits for the winner's state file, so both
 * report the same pid and port.
 */
import { Data, Effect, Either, Option, Schema } from "effect"
import { type ChildProcess, spawn } from "node:child_process"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import type { Readable } from "node:stream"
import { DaemonState, ReadyLine } from "../schemas/Protocol.js"
import { daemonPaths, decodeReadySignal, isPidAlive, type ReadySignal } from "./daemon.js"

export interface StartDaemonOptions {
  /** How to run sicksync as the daemon, e.g. `[process.execPath, ...DAEMON_NODE_FLAGS, process.argv[1]]`. */
  readonly command: ReadonlyArray<string>
  readonly port: number
  readonly graceMs: number
  /** Whose daemon (defaults to `os.homedir()`); passed to the daemon as `$HOME`. */
  readonly home?: string | undefined
  /** How long to wait for the daemon to be ready. Default 10 s. */
  readonly timeoutMs?: number | undefined
}

export class StartDaemonError extends Data.TaggedError("StartDaemonError")<{
  readonly reason: "spawn" | "timeout" | "failed" | "exited"
  readonly message: string
  /** The last lines of `~/.sicksync/logs/daemon.log`. */
  readonly logTail: string
}> {}

const decodeState = Schema.decodeUnknownEither(Schema.parseJson(DaemonState))
const encodeReadyLine = Schema.encodeSync(Schema.parseJson(ReadyLine))

const MAX_LOG_BYTES = 5 * 1024 * 1024
/** How long a daemon that reported `Failed` gets to exit (and finish writing why to its log). */
const FAILED_EXIT_WAIT_MS = 2_000

/** Connects to 127.0.0.1:port (true when something accepts). */
export const canConnect = (port: number, timeoutMs = 1_000): Effect.Effect<boolean> =>
  Effect.async<boolean>((resume) => {
    const socket = net.connect({ host: "127.0.0.1", port })
    const done = (ok: boolean) => {
      socket.destroy()
      resume(Effect.succeed(ok))
    }
    socket.setTimeout(timeoutMs, () => done(false))
    socket.once("connect", () => done(true))
    socket.once("error", () => done(false))
    return Effect.sync(() => socket.destroy())
  })

/** The running daemon of `home`, if its state file names a live pid that accepts TCP connections. */
export const probeDaemon = (home: string): Effect.Effect<Option.Option<DaemonState>> =>
  Effect.gen(function*() {
    const text = yield* Effect.sync(() => {
      try {
        return fs.readFileSync(daemonPaths(home).statePath, "utf8")
      } catch {
        return undefined
      }
    })
    if (text === undefined) return Option.none()
    const state = decodeState(text)
    if (Either.isLeft(state) || !isPidAlive(state.right.pid)) return Option.none()
    return (yield* canConnect(state.right.port)) ? Option.some(state.right) : Option.none()
  })

const readLogTail = (logPath: string, maxBytes = 4096): string => {
  try {
    const fd = fs.openSync(logPath, "r")
    try {
      const size = fs.fstatSync(fd).size
      const length = Math.min(size, maxBytes)
      const buffer = Buffer.alloc(length)
      fs.readSync(fd, buffer, 0, length, size - length)
      const lines = buffer.toString("utf8").split("\n")
      if (size > length) lines.shift() // partial first line
      return lines.slice(-20).join("\n").trim()
    } finally {
      fs.closeSync(fd)
    }
  } catch {
    return ""
  }
}

const fromState = (state: DaemonState): ReadyLine => ({
  port: state.port,
  pid: state.pid,
  version: state.version,
  protocolVersion: state.protocolVersion,
  started: false
})

type SpawnOutcome =
  | { readonly _tag: "Signal"; readonly signal: ReadySignal }
  | { readonly _tag: "Exited"; readonly code: number | null; readonly signal: string | null }
  | { readonly _tag: "SpawnError"; readonly message: string }

/** Spawns the daemon detached and waits for its ready line on fd 3; the child is unref'd either way. */
const spawnDaemon = (options: StartDaemonOptions, home: string, timeoutMs: number) =>
  Effect.gen(function*() {
    const paths = daemonPaths(home)
    const logFd = yield* Effect.try({
      try: () => {
        fs.mkdirSync(paths.dir, { recursive: true, mode: 0o700 })
        fs.chmodSync(paths.dir, 0o700)
        fs.mkdirSync(paths.logDir, { recursive: true, mode: 0o700 })
        try {
          if (fs.statSync(paths.logPath).size > MAX_LOG_BYTES) fs.renameSync(paths.logPath, paths.logPath + ".1")
        } catch {
          // no log yet
        }
        return fs.openSync(paths.logPath, "a", 0o600)
      },
      catch: (cause) =>
        new StartDaemonError({
          reason: "spawn",
          message: `cannot open ${paths.logPath}: ${cause instanceof Error ? cause.message : String(cause)}`,
          logTail: ""
        })
    })
    const [command, ...prefix] = options.command
    const args = [
      ...prefix,
      "daemon",
      "--port",
      String(options.port),
      "--grace-ms",
      String(options.graceMs),
      "--ready-fd",
      "3"
    ]
    const outcome = yield* Effect.async<SpawnOutcome>((resume) => {
      let settled = false
      let child: ChildProcess
      try {
        child = spawn(command ?? process.execPath, args, {
          detached: true,
          stdio: ["ignore", logFd, logFd, "pipe"],
          env: { ...process.env, HOME: home }
        })
      } catch (e) {
        fs.closeSync(logFd)
        resume(Effect.succeed({ _tag: "SpawnError", message: `cannot run ${command}: ${e instanceof Error ? e.message : String(e)}` }))
        return
      }
      fs.closeSync(logFd) // the child has its own copy
      const ready = child.stdio[3] as Readable | null
      /** Lets go of the child (so this process can exit) and optionally kills it. */
      const release = (kill: boolean) => {
        clearTimeout(timer)
        clearTimeout(exitWait)
        ready?.destroy()
        child.removeAllListeners("exit")
        child.unref()
        if (kill) {
          try {
            child.kill("SIGTERM")
          } catch {
            // already gone
          }
        }
      }
      const settle = (outcome: SpawnOutcome, kill = false) => {
        if (settled) return
        settled = true
        release(kill)
        resume(Effect.succeed(outcome))
      }
      /**
       * A `Failed` signal, held back until the daemon has exited: it signals first and writes why it
       * failed to its log (our log tail) on the way out.
       */
      let failed: SpawnOutcome | undefined
      let exitWait: ReturnType<typeof setTimeout> | undefined
      let buffered = ""
      ready?.setEncoding("utf8")
      ready?.on("data", (text: string) => {
        if (failed !== undefined) return
        buffered += text
        const newline = buffered.indexOf("\n")
        if (newline < 0) return
        const signal = decodeReadySignal(buffered.slice(0, newline))
        if (Either.isLeft(signal)) {
          settle({ _tag: "SpawnError", message: `unexpected ready line from the daemon: ${buffered.slice(0, 200)}` }, true)
        } else if (signal.right._tag === "Failed") {
          const outcome: SpawnOutcome = { _tag: "Signal", signal: signal.right }
          failed = outcome
          exitWait = setTimeout(() => settle(outcome, true), FAILED_EXIT_WAIT_MS)
        } else {
          settle({ _tag: "Signal", signal: signal.right })
        }
      })
      ready?.on("error", () => undefined)
      child.on("error", (e) => settle({ _tag: "SpawnError", message: `cannot run ${command}: ${e.message}` }))
      child.once("exit", (code, signal) => {
        // a ready line written just before exiting may still be in the pipe
        setTimeout(() => settle(failed ?? { _tag: "Exited", code, signal }), 50)
      })
      const timer = setTimeout(() => settle({ _tag: "Exited", code: null, signal: "timeout" }, true), timeoutMs)
      return Effect.sync(() => {
        if (!settled) {
          settled = true
          release(true)
        }
      })
    })
    return outcome
  })

/**
 * Ensures a daemon runs for `home` and returns its ready line (without printing it).
 */
export const startDaemon = Effect.fn("startDaemon")(function*(options: StartDaemonOptions) {
  const home = options.home ?? os.homedir()
  const paths = daemonPaths(home)
  const timeoutMs = options.timeoutMs ?? 10_000
  const deadline = Date.now() + timeoutMs
  const fail = (reason: StartDaemonError["reason"], message: string) => {
    const logTail = readLogTail(paths.logPath)
    return Effect.fail(
      new StartDaemonError({
        reason,
        message: logTail === "" ? message : `${message}\nlast lines of ${paths.logPath}:\n${logTail}`,
        logTail
      })
    )
  }

  /** Waits until the daemon `pid` has published an answering state file. */
  const awaitWinner = (pid: number) =>
    Effect.gen(function*() {
      while (Date.now() < deadline) {
        const running = yield* probeDaemon(home)
        if (Option.isSome(running) && running.value.pid === pid) return Option.some(running.value)
        if (!isPidAlive(pid)) return Option.none<DaemonState>()
        yield* Effect.sleep(50)
      }
      return Option.none<DaemonState>()
    })

  for (let attempt = 0; attempt < 3; attempt++) {
    const running = yield* probeDaemon(home)
    if (Option.isSome(running)) return fromState(running.value)

    const outcome = yield* spawnDaemon(options, home, Math.max(deadline - Date.now(), 1))
    switch (outcome._tag) {
      case "SpawnError":
        return yield* fail("spawn", outcome.message)
      case "Exited":
        if (outcome.signal === "timeout") {
          return yield* fail("timeout", `the daemon did not report ready within ${timeoutMs} ms (see ${paths.logPath})`)
        }
        return yield* fail(
          "exited",
          `the daemon exited before it was ready (${outcome.signal !== null ? `signal ${outcome.signal}` : `code ${outcome.code}`}; see ${paths.logPath})`
        )
      case "Signal": {
        const signal = outcome.signal
        if (signal._tag === "Ready") {
          return {
            port: signal.port,
            pid: signal.pid,
            version: signal.version,
            protocolVersion: signal.protocolVersion,
            started: true
          } satisfies ReadyLine
        }
        if (signal._tag === "Failed") return yield* fail("failed", `the daemon could not start: ${signal.message}`)
        // lost the lock race: report the winner once it answers
        const winner = yield* awaitWinner(signal.pid)
        if (Option.isSome(winner)) return fromState(winner.value)
        if (Date.now() >= deadline) {
          return yield* fail(
            "timeout",
            `a daemon (pid ${signal.pid}) holds ${paths.lockPath} but did not answer within ${timeoutMs} ms`
          )
        }
        // the winner went away meanwhile: try again
      }
    }
  }
  return yield* fail("failed", "could not start or find a daemon")
})

/** Runs `startDaemon` and prints exactly one ReadyLine JSON line on stdout. */
export const startDaemonAndPrint = (options: StartDaemonOptions) =>
  Effect.flatMap(startDaemon(options), (line) => Effect.sync(() => process.stdout.write(encodeReadyLine(line) + "\n")))

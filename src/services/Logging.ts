/**
 * Human-facing log output: `[project] [destination] message`, taken from the `project` and `dest`
 * log annotations. Info and debug go to stdout, warnings and errors to stderr.
 */
import { Cause, Effect, HashMap, Layer, Logger, LogLevel, Option } from "effect"
import { Status } from "./Status.js"

const text = (message: unknown): string =>
  Array.isArray(message) ? message.map(text).join(" ") : typeof message === "string" ? message : String(message)

export const format = (options: {
  readonly level: LogLevel.LogLevel
  readonly message: unknown
  readonly annotations: HashMap.HashMap<string, unknown>
  readonly cause: Cause.Cause<unknown>
}): string => {
  const tag = (key: string) =>
    HashMap.get(options.annotations, key).pipe(
      Option.map((v) => `[${String(v)}] `),
      Option.getOrElse(() => "")
    )
  const level =
    options.level._tag === "Warning" ? "warning: " : LogLevel.greaterThanEqual(options.level, LogLevel.Error) ? "error: " : ""
  const cause = Cause.isEmpty(options.cause) ? "" : `\n${Cause.pretty(options.cause, { renderErrorCause: true })}`
  return `${tag("project")}${tag("dest")}${level}${text(options.message)}${cause}`
}

/** Writes each entry as one line through `write` (the Status service's, to keep its live line whole). */
export const makeLogger = (write: (text: string, stream: "stdout" | "stderr") => void) =>
  Logger.make(({ annotations, cause, logLevel, message }) => {
    const line = format({ level: logLevel, message, annotations, cause })
    write(line, LogLevel.greaterThanEqual(logLevel, LogLevel.Warning) ? "stderr" : "stdout")
  })

/** The logger, writing through `Status`. */
export const layer: Layer.Layer<never, never, Status> = Layer.unwrapEffect(
  Effect.map(Status, (status) => Logger.replace(Logger.defaultLogger, makeLogger(status.line)))
)

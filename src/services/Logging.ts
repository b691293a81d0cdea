/**
 * Human-facing log output: `[project] [destination] message`, taken from the `project` and `dest`
 * log annotations. Info and debug go to stdout, warnings and errors to stderr.
 */
import { Cause, HashMap, Logger, LogLevel, Option } from "effect"

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

export const logger = Logger.make(({ annotations, cause, logLevel, message }) => {
  const line = format({ level: logLevel, message, annotations, cause })
  if (LogLevel.greaterThanEqual(logLevel, LogLevel.Warning)) process.stderr.write(`${line}\n`)
  else process.stdout.write(`${line}\n`)
})

export const layer = Logger.replace(Logger.defaultLogger, logger)

/**
 * The shapes of sicksync's configuration files. Data only: reading, normalising legacy
 * spellings and resolving paths happen in `services/Config.ts`.
 */
import { Schema } from "effect"
import type { ParseIssue } from "effect/ParseResult"

export const PROJECT_FILE = ".sicksync-config.json"
export const REGISTRY_FILE = ".sicksync-config.json"
export const DEFAULT_EXCLUDES: ReadonlyArray<string> = [".git", ".idea", "*.swp", ".svn"]
export const DEFAULT_EXCLUDES_FILE: ReadonlyArray<string> = [".gitignore"]
export const DEFAULT_WEBSOCKET_PORT = 8675

const show = (actual: unknown): string => {
  if (actual === undefined) return "nothing"
  const json = JSON.stringify(actual)
  return json === undefined ? String(actual) : json.length > 60 ? `${json.slice(0, 57)}...` : json
}

/**
 * "expected <what>, got <actual>" instead of Effect's generic message. On leaves it replaces every
 * inner message; on containers (`shape`) only the container's own failure, so an error inside a
 * list still names the innermost field.
 */
const expected = <S extends Schema.Schema.Any>(what: string, override = true) => (schema: S) =>
  schema.annotations({
    message: (issue: ParseIssue) => ({ message: `expected ${what}, got ${show(issue.actual)}`, override })
  }) as unknown as S
const shape = <S extends Schema.Schema.Any>(what: string) => expected<S>(what, false)

const NonEmptyString = Schema.String.pipe(Schema.trimmed(), Schema.minLength(1), expected("a non-empty string"))
const PortNumber = Schema.Number.pipe(Schema.int(), Schema.between(1, 65535), expected("an integer between 1 and 65535"))
const ListenPort = Schema.Number.pipe(
  Schema.int(),
  Schema.between(0, 65535),
  expected("an integer between 0 and 65535 (0 = any free port)")
)
const StringList = Schema.Array(Schema.String.pipe(expected("a string"))).pipe(shape("a list of strings"))
const Bool = Schema.Boolean.pipe(expected("true or false"))

/** Absolute, or relative to the remote user's home with `~/`. `~` alone is refused: the home itself is never a root. */
export const RemotePath = Schema.String.pipe(
  Schema.filter((s) => s.startsWith("/") || (s.startsWith("~/") && s.length > 2)),
  expected("an absolute path or one starting with ~/")
)

export const Transport = Schema.Literal("ssh", "local").pipe(expected(`"ssh" or "local"`))
export type Transport = typeof Transport.Type

export const Alias = Schema.String.pipe(
  Schema.pattern(/^[A-Za-z0-9][A-Za-z0-9._-]*$/),
  expected("an alias of letters, digits, '.', '_' or '-' (not starting with '-')")
)

export const Destination = Schema.Struct({
  /** Label used in logs; defaults to the hostname. */
  name: Schema.optionalWith(NonEmptyString, { exact: true }),
  hostname: NonEmptyString,
  destinationLocation: RemotePath,
  username: Schema.optionalWith(NonEmptyString, { exact: true }),
  port: Schema.optionalWith(PortNumber, { exact: true }),
  identityFile: Schema.optionalWith(NonEmptyString, { exact: true }),
  websocketPort: Schema.optionalWith(ListenPort, { exact: true }),
  transport: Schema.optionalWith(Transport, { exact: true })
}).pipe(shape("an object with hostname and destinationLocation")).annotations({
  identifier: "Destination",
  description: "A machine and directory to mirror the project onto"
})
export type Destination = typeof Destination.Type

export const ProjectFile = Schema.Struct({
  $schema: Schema.optionalWith(Schema.String, { exact: true }),
  project: Schema.optionalWith(NonEmptyString, { exact: true }),
  destinations: Schema.Array(Destination).pipe(
    shape("a list of destinations"),
    Schema.minItems(1),
    shape("a non-empty list of destinations")
  ),
  excludes: Schema.optionalWith(StringList, { exact: true }),
  excludesFile: Schema.optionalWith(Schema.Union(Schema.String, StringList).pipe(expected("a path or a list of paths")), {
    exact: true
  }),
  followSymLinks: Schema.optionalWith(Bool, { exact: true }),
  websocketPort: Schema.optionalWith(ListenPort, { exact: true })
}).pipe(shape("a JSON object")).annotations({
  identifier: "ProjectFile",
  title: "sicksync project configuration (.sicksync-config.json)"
})
export type ProjectFile = typeof ProjectFile.Type

/** User-wide defaults for destinations that leave a field out. */
export const UserDefaults = Schema.Struct({
  username: Schema.optionalWith(NonEmptyString, { exact: true }),
  identityFile: Schema.optionalWith(NonEmptyString, { exact: true }),
  websocketPort: Schema.optionalWith(ListenPort, { exact: true }),
  excludes: Schema.optionalWith(StringList, { exact: true })
})
export type UserDefaults = typeof UserDefaults.Type

export const RegistryEntry = Schema.Struct({
  path: Schema.String.pipe(Schema.filter((s) => s.startsWith("/")), expected("an absolute path")),
  alias: Schema.optionalWith(Alias, { exact: true }),
  active: Schema.optionalWith(Bool, { exact: true })
})
export type RegistryEntry = typeof RegistryEntry.Type

export const Registry = Schema.Struct({
  $schema: Schema.optionalWith(Schema.String, { exact: true }),
  projects: Schema.Array(RegistryEntry).pipe(shape("a list of projects")),
  defaults: Schema.optionalWith(UserDefaults, { exact: true })
}).pipe(shape("a JSON object")).annotations({
  identifier: "Registry",
  title: "sicksync global registry (~/.sicksync-config.json)"
})
export type Registry = typeof Registry.Type

/** A project of the 2.x/3.x `~/.sicksync/config.json`, or the whole 1.x flat `~/.sicksync-config.json`. */
export const LegacyProject = Schema.Struct({
  project: Schema.optionalWith(NonEmptyString, { exact: true }),
  hostname: NonEmptyString,
  username: Schema.optionalWith(NonEmptyString, { exact: true }),
  userName: Schema.optionalWith(NonEmptyString, { exact: true }),
  sourceLocation: NonEmptyString,
  destinationLocation: NonEmptyString,
  excludes: Schema.optionalWith(StringList, { exact: true }),
  excludesFile: Schema.optionalWith(Schema.Union(Schema.String, StringList), { exact: true }),
  websocketPort: Schema.optionalWith(Schema.Union(ListenPort, Schema.NumberFromString), { exact: true }),
  followSymLinks: Schema.optionalWith(Bool, { exact: true }),
  followSymlinks: Schema.optionalWith(Bool, { exact: true })
})
export type LegacyProject = typeof LegacyProject.Type

export const LegacyConfig = Schema.Struct({
  projects: Schema.Array(LegacyProject).pipe(shape("a list of projects"))
})

// ---- resolved, ready to run -------------------------------------------------------------------

export interface ResolvedDestination {
  /** Unique within its project: the hostname, or `hostname:path` when a host appears twice. */
  readonly name: string
  readonly hostname: string
  readonly destinationLocation: string
  readonly username: string | undefined
  readonly port: number | undefined
  readonly identityFile: string | undefined
  readonly websocketPort: number
  readonly transport: Transport
}

export interface ResolvedProject {
  readonly name: string
  readonly alias: string | undefined
  /** Absolute path of the project's top level (where its config file is). */
  readonly root: string
  /** The file it was read from (for legacy projects: the legacy file). */
  readonly configFile: string
  readonly destinations: ReadonlyArray<ResolvedDestination>
  readonly excludes: ReadonlyArray<string>
  /** Absolute paths. */
  readonly excludesFile: ReadonlyArray<string>
  readonly followSymLinks: boolean
}

/**
 * SyncConfig: finds, reads, validates and writes sicksync's configuration files, and resolves
 * what a command line asks for into `ResolvedProject`s. Every problem is a `ConfigError` naming
 * the file, the JSON path, what was expected and what was found — raised before any work starts.
 */
import * as FileSystem from "@effect/platform/FileSystem"
import { Context, Data, Effect, Either, Layer, ParseResult, Schema } from "effect"
import { parse as parseJsonc, printParseErrorCode, type ParseError as JsoncError } from "jsonc-parser"
import * as os from "node:os"
import * as path from "node:path"
import {
  DEFAULT_EXCLUDES,
  DEFAULT_EXCLUDES_FILE,
  DEFAULT_WEBSOCKET_PORT,
  LegacyConfig,
  LegacyProject,
  PROJECT_FILE,
  ProjectFile,
  REGISTRY_FILE,
  Registry,
  type Destination,
  type RegistryEntry,
  type ResolvedDestination,
  type ResolvedProject,
  type UserDefaults
} from "../schemas/ConfigFile.js"

// ---- errors -----------------------------------------------------------------------------------

export class ConfigError extends Data.TaggedError("ConfigError")<{
  readonly file: string
  /** Each `path: problem`, or just the problem when it concerns the whole file. */
  readonly issues: ReadonlyArray<string>
  /** Further broken files found in the same pass (e.g. under `--all`). */
  readonly others?: ReadonlyArray<ConfigError>
}> {
  override get message(): string {
    const own = this.issues.map((issue) => `${this.file}: ${issue}`)
    return [...own, ...(this.others ?? []).map((e) => e.message)].join("\n")
  }
}

/** Nothing matches what the command line asked for; the message says what exists and how to pick it. */
export class ProjectNotFound extends Data.TaggedError("ProjectNotFound")<{ readonly message: string }> {}

/** A registry change that cannot be made (duplicate alias, unknown project, …). */
export class RegistryConflict extends Data.TaggedError("RegistryConflict")<{ readonly message: string }> {}

// ---- reading JSON with useful errors ----------------------------------------------------------

const jsonErrorText: Record<string, string> = {
  InvalidSymbol: "unexpected character",
  InvalidNumberFormat: "invalid number",
  PropertyNameExpected: "expected a property name in double quotes",
  ValueExpected: "expected a value",
  ColonExpected: "expected ':'",
  CommaExpected: "expected ',' (or a closing bracket)",
  CloseBraceExpected: "expected '}'",
  CloseBracketExpected: "expected ']'",
  EndOfFileExpected: "unexpected content after the end of the JSON value",
  InvalidCommentToken: "comments are not allowed in JSON",
  UnexpectedEndOfComment: "unterminated comment",
  UnexpectedEndOfString: "unterminated string",
  UnexpectedEndOfNumber: "unterminated number",
  InvalidUnicode: "invalid unicode escape",
  InvalidEscapeCharacter: "invalid escape character",
  InvalidCharacter: "invalid character in string"
}

const lineAndColumn = (text: string, offset: number) => {
  const before = text.slice(0, offset)
  const line = before.split("\n").length
  return { line, column: offset - before.lastIndexOf("\n") }
}

/** Parses strict JSON; a syntax error points at its line and column. */
export const parseJsonText = (file: string, text: string): Either.Either<unknown, ConfigError> => {
  const errors: Array<JsoncError> = []
  // Checked first: the parser reports an empty text as "expected a value" at line 1, column 1.
  if (text.trim() === "") return Either.left(new ConfigError({ file, issues: ["invalid JSON: the file is empty"] }))
  const value: unknown = parseJsonc(text, errors, { disallowComments: true, allowTrailingComma: false })
  if (errors.length === 0) return Either.right(value)
  const first = errors[0]!
  const { line, column } = lineAndColumn(text, first.offset)
  const what = jsonErrorText[printParseErrorCode(first.error)] ?? printParseErrorCode(first.error)
  return Either.left(new ConfigError({ file, issues: [`invalid JSON at line ${line}, column ${column}: ${what}`] }))
}

const formatParseError = (error: ParseResult.ParseError): ReadonlyArray<string> =>
  ParseResult.ArrayFormatter.formatErrorSync(error).map((issue) => {
    const where = issue.path.join(".")
    const message = issue._tag === "Missing" ? "is required but missing" : issue.message
    return where === "" ? message : `${where}: ${message}`
  })

const decodeWith = <A, I>(schema: Schema.Schema<A, I>, file: string, value: unknown) =>
  Schema.decodeUnknownEither(schema, { errors: "all", onExcessProperty: "ignore" })(value).pipe(
    Either.mapLeft((error) => new ConfigError({ file, issues: formatParseError(error) }))
  )

// ---- normalising legacy spellings and noticing unknown keys -----------------------------------

const isRecord = (u: unknown): u is Record<string, unknown> => typeof u === "object" && u !== null && !Array.isArray(u)

const PROJECT_KEYS = new Set(["$schema", "project", "destinations", "excludes", "excludesFile", "followSymLinks", "websocketPort"])
const DESTINATION_KEYS = new Set([
  "name",
  "hostname",
  "destinationLocation",
  "username",
  "port",
  "identityFile",
  "websocketPort",
  "transport"
])
const REGISTRY_KEYS = new Set(["$schema", "projects", "defaults"])
const REGISTRY_ENTRY_KEYS = new Set(["path", "alias", "active"])
const DEFAULTS_KEYS = new Set(["username", "identityFile", "websocketPort", "excludes"])

/** Warnings for registry keys nobody reads. */
export const registryWarnings = (raw: unknown): ReadonlyArray<string> => {
  if (!isRecord(raw)) return []
  const unknown = (value: unknown, known: ReadonlySet<string>, prefix: string) =>
    isRecord(value) ? Object.keys(value).filter((k) => !known.has(k)).map((k) => `${prefix}${k}: unknown key, ignored`) : []
  return [
    ...unknown(raw, REGISTRY_KEYS, ""),
    ...(Array.isArray(raw.projects) ? raw.projects.flatMap((p, i) => unknown(p, REGISTRY_ENTRY_KEYS, `projects.${i}.`)) : []),
    ...unknown(raw.defaults, DEFAULTS_KEYS, "defaults.")
  ]
}

/** Single-destination spelling of 1.x/2.x: these top-level keys describe the one destination. */
const LEGACY_DESTINATION_KEYS = ["hostname", "destinationLocation", "username", "userName", "port", "identityFile", "transport"]

const normaliseDestination = (raw: unknown): unknown => {
  if (!isRecord(raw) || !("userName" in raw)) return raw
  const { userName, ...rest } = raw
  return "username" in rest ? rest : { ...rest, username: userName }
}

/** Rewrites legacy spellings into the current shape; returns warnings for keys nobody reads. */
export const normaliseProjectJson = (raw: unknown): { readonly value: unknown; readonly warnings: ReadonlyArray<string> } => {
  if (!isRecord(raw)) return { value: raw, warnings: [] }
  const out: Record<string, unknown> = {}
  const warnings: Array<string> = []
  const legacyDestination: Record<string, unknown> = {}
  for (const [key, value] of Object.entries(raw)) {
    if (key === "followSymlinks") {
      if (!("followSymLinks" in raw)) out.followSymLinks = value
    } else if (LEGACY_DESTINATION_KEYS.includes(key) && !("destinations" in raw)) {
      legacyDestination[key] = value
    } else if (PROJECT_KEYS.has(key)) {
      out[key] = value
    } else {
      warnings.push(`${key}: unknown key, ignored`)
    }
  }
  if (Object.keys(legacyDestination).length > 0) {
    if ("websocketPort" in raw) legacyDestination.websocketPort = raw.websocketPort
    out.destinations = [legacyDestination]
  }
  if (Array.isArray(out.destinations)) {
    out.destinations = out.destinations.map((destination, i) => {
      const normalised = normaliseDestination(destination)
      if (isRecord(normalised)) {
        for (const key of Object.keys(normalised)) {
          if (!DESTINATION_KEYS.has(key)) warnings.push(`destinations.${i}.${key}: unknown key, ignored`)
        }
      }
      return normalised
    })
  }
  return { value: out, warnings }
}

/** Validates the JSON of a project file; warnings name keys nobody reads. */
export const decodeProjectJson = (
  file: string,
  json: unknown
): Either.Either<{ readonly config: ProjectFile; readonly warnings: ReadonlyArray<string> }, ConfigError> => {
  const { value, warnings } = normaliseProjectJson(json)
  return decodeWith(ProjectFile, file, value).pipe(Either.map((config) => ({ config, warnings })))
}

/** What a `.sicksync-config.json` holds, judged by its shape. */
export type ConfigFileKind = "project" | "registry" | "legacy-flat"
export const classifyConfigJson = (raw: unknown): ConfigFileKind =>
  isRecord(raw) && "projects" in raw ? "registry" : isRecord(raw) && "sourceLocation" in raw ? "legacy-flat" : "project"

// ---- resolving --------------------------------------------------------------------------------

export const expandHome = (home: string, p: string): string =>
  p === "~" ? home : p.startsWith("~/") ? path.join(home, p.slice(2)) : p

const toList = (v: string | ReadonlyArray<string> | undefined, fallback: ReadonlyArray<string>) =>
  v === undefined ? fallback : typeof v === "string" ? [v] : v

const resolveDestinations = (
  file: string,
  destinations: ReadonlyArray<Destination>,
  projectPort: number | undefined,
  defaults: UserDefaults | undefined
): Either.Either<ReadonlyArray<ResolvedDestination>, ConfigError> => {
  const hostCount = new Map<string, number>()
  for (const d of destinations) hostCount.set(d.hostname, (hostCount.get(d.hostname) ?? 0) + 1)
  const resolved = destinations.map(
    (d): ResolvedDestination => ({
      name: d.name ?? ((hostCount.get(d.hostname) ?? 0) > 1 ? `${d.hostname}:${d.destinationLocation}` : d.hostname),
      hostname: d.hostname,
      destinationLocation: d.destinationLocation,
      username: d.username ?? defaults?.username,
      port: d.port,
      identityFile: d.identityFile ?? defaults?.identityFile,
      websocketPort: d.websocketPort ?? projectPort ?? defaults?.websocketPort ?? DEFAULT_WEBSOCKET_PORT,
      transport: d.transport ?? "ssh"
    })
  )
  const seen = new Map<string, number>()
  const issues: Array<string> = []
  resolved.forEach((d, i) => {
    const earlier = seen.get(d.name)
    if (earlier !== undefined) issues.push(`destinations.${i}: same name "${d.name}" as destinations.${earlier}; give one a "name"`)
    else seen.set(d.name, i)
  })
  return issues.length > 0 ? Either.left(new ConfigError({ file, issues })) : Either.right(resolved)
}

export const resolveProjectFile = (options: {
  readonly file: string
  readonly config: ProjectFile
  readonly alias: string | undefined
  readonly defaults: UserDefaults | undefined
}): Either.Either<ResolvedProject, ConfigError> => {
  const { config, defaults, file } = options
  const root = path.dirname(file)
  return resolveDestinations(file, config.destinations, config.websocketPort, defaults).pipe(
    Either.map((destinations) => ({
      name: config.project ?? path.basename(root),
      alias: options.alias,
      root,
      configFile: file,
      destinations,
      excludes: config.excludes ?? defaults?.excludes ?? DEFAULT_EXCLUDES,
      excludesFile: toList(config.excludesFile, DEFAULT_EXCLUDES_FILE).map((f) => path.resolve(root, f)),
      followSymLinks: config.followSymLinks ?? false
    }))
  )
}

/** A project of a legacy config, as the 2.0 project file it migrates to. */
export const legacyToProjectFile = (legacy: LegacyProject): ProjectFile => {
  const username = legacy.username ?? legacy.userName
  const followSymLinks = legacy.followSymLinks ?? legacy.followSymlinks
  return {
    ...(legacy.project !== undefined ? { project: legacy.project } : {}),
    destinations: [
      {
        hostname: legacy.hostname,
        destinationLocation: legacy.destinationLocation,
        ...(username !== undefined ? { username } : {})
      }
    ],
    ...(legacy.excludes !== undefined ? { excludes: legacy.excludes } : {}),
    ...(legacy.excludesFile !== undefined ? { excludesFile: legacy.excludesFile } : {}),
    ...(followSymLinks !== undefined ? { followSymLinks } : {}),
    ...(legacy.websocketPort !== undefined ? { websocketPort: legacy.websocketPort } : {})
  }
}

export interface LegacySource {
  readonly file: string
  readonly format: "2.x" | "1.x"
  readonly projects: ReadonlyArray<LegacyProject>
}

/** Project `index` of a legacy source as a valid project file; issues name the path in the legacy file. */
export const decodeLegacyProject = (source: LegacySource, index: number): Either.Either<ProjectFile, ConfigError> =>
  decodeWith(ProjectFile, source.file, legacyToProjectFile(source.projects[index]!)).pipe(
    Either.mapLeft(
      (error) =>
        new ConfigError({
          file: error.file,
          issues: error.issues.map((issue) =>
            `${source.format === "2.x" ? `projects.${index}.` : ""}${issue.replace(/^destinations\.0\./, "")}`
          )
        })
    )
  )

export interface Registered {
  readonly entry: RegistryEntry
  readonly name: string
}

export interface ResolveRequest {
  readonly aliases: ReadonlyArray<string>
  readonly all: boolean
  readonly global: boolean
  readonly cwd: string
}

export interface LoadedRegistry {
  readonly file: string
  /** `undefined` when there is no registry file (or it is a legacy or project file). */
  readonly registry: Registry | undefined
}

// ---- the service ------------------------------------------------------------------------------

export class SyncConfig extends Context.Tag("sicksync/Config")<
  SyncConfig,
  {
    readonly home: string
    readonly registryFile: string
    /** Reads a project file; warnings (unknown keys) are logged. */
    readonly readProjectFile: (file: string) => Effect.Effect<ProjectFile, ConfigError>
    /** The closest `.sicksync-config.json` that is a project file, from `dir` upwards. */
    readonly findProjectFile: (dir: string) => Effect.Effect<string | undefined, ConfigError>
    readonly loadProject: (file: string) => Effect.Effect<ResolvedProject, ConfigError>
    /** Reads a loaded project's config again from where it came from: its project file, or its legacy file. */
    readonly reload: (project: ResolvedProject) => Effect.Effect<ResolvedProject, ConfigError>
    readonly readRegistry: Effect.Effect<LoadedRegistry, ConfigError>
    readonly writeRegistry: (registry: Registry) => Effect.Effect<void, ConfigError>
    readonly readLegacy: Effect.Effect<ReadonlyArray<LegacySource>, ConfigError>
    readonly resolve: (request: ResolveRequest) => Effect.Effect<ReadonlyArray<ResolvedProject>, ConfigError | ProjectNotFound>
    /** Writes JSON atomically (temp file + rename), creating parent directories. */
    readonly writeJson: (file: string, value: unknown) => Effect.Effect<void, ConfigError>
  }
>() {}

export const make = (options: { readonly home?: string } = {}) =>
  Effect.gen(function* () {
    const fs = yield* FileSystem.FileSystem
    const home = path.resolve(options.home ?? os.homedir())
    const registryFile = path.join(home, REGISTRY_FILE)
    const legacyFile = path.join(home, ".sicksync", "config.json")
    /** Registry warnings already logged by this instance. */
    const warned = new Set<string>()

    const ioError = (file: string, what: string) => (cause: unknown) =>
      new ConfigError({ file, issues: [`cannot ${what}: ${cause instanceof Error ? cause.message : String(cause)}`] })

    /** The parsed JSON of a file, or undefined when there is no such file. */
    const readJson = (file: string) =>
      Effect.gen(function* () {
        const exists = yield* fs.exists(file).pipe(Effect.mapError(ioError(file, "check")))
        if (!exists) return undefined
        const text = yield* fs.readFileString(file).pipe(Effect.mapError(ioError(file, "read")))
        return { json: yield* parseJsonText(file, text) }
      })

    const decodeProject = (file: string, json: unknown) =>
      Effect.gen(function* () {
        const { config, warnings } = yield* decodeProjectJson(file, json)
        for (const warning of warnings) yield* Effect.logWarning(`${file}: ${warning}`)
        return config
      })

    const readProjectFile = Effect.fn("Config.readProjectFile")(function* (file: string) {
      const read = yield* readJson(file)
      if (read === undefined) return yield* new ConfigError({ file, issues: ["no such file"] })
      return yield* decodeProject(file, read.json)
    })

    const findProjectFile = Effect.fn("Config.findProjectFile")(function* (from: string) {
      let dir = path.resolve(from)
      for (;;) {
        const file = path.join(dir, PROJECT_FILE)
        const read = yield* readJson(file)
        if (read !== undefined && classifyConfigJson(read.json) === "project") return file
        const parent = path.dirname(dir)
        if (parent === dir) return undefined
        dir = parent
      }
    })

    const readRegistry: Effect.Effect<LoadedRegistry, ConfigError> = Effect.gen(function* () {
      const read = yield* readJson(registryFile)
      if (read === undefined || classifyConfigJson(read.json) !== "registry") return { file: registryFile, registry: undefined }
      const registry = yield* decodeWith(Registry, registryFile, read.json)
      const issues: Array<string> = []
      const aliases = new Map<string, number>()
      registry.projects.forEach((p, i) => {
        if (p.alias === undefined) return
        const earlier = aliases.get(p.alias)
        if (earlier !== undefined) issues.push(`projects.${i}.alias: "${p.alias}" is already the alias of projects.${earlier}`)
        else aliases.set(p.alias, i)
      })
      if (issues.length > 0) return yield* new ConfigError({ file: registryFile, issues })
      // Commands read the registry more than once: say each thing once.
      for (const warning of registryWarnings(read.json)) {
        if (warned.has(warning)) continue
        warned.add(warning)
        yield* Effect.logWarning(`${registryFile}: ${warning}`)
      }
      return { file: registryFile, registry }
    }).pipe(Effect.withSpan("Config.readRegistry"))

    const writeJson = Effect.fn("Config.writeJson")(function* (file: string, value: unknown) {
      const temp = `${file}.${process.pid}.tmp`
      yield* Effect.gen(function* () {
        yield* fs.makeDirectory(path.dirname(file), { recursive: true })
        yield* fs.writeFileString(temp, `${JSON.stringify(value, null, 2)}\n`)
        yield* fs.rename(temp, file)
      }).pipe(
        Effect.tapError(() => fs.remove(temp).pipe(Effect.ignore)),
        Effect.mapError(ioError(file, "write"))
      )
    })

    const writeRegistry = (registry: Registry) => writeJson(registryFile, registry)

    const readLegacy: Effect.Effect<ReadonlyArray<LegacySource>, ConfigError> = Effect.gen(function* () {
      const sources: Array<LegacySource> = []
      const v2 = yield* readJson(legacyFile)
      if (v2 !== undefined) {
        const config = yield* decodeWith(LegacyConfig, legacyFile, v2.json)
        sources.push({ file: legacyFile, format: "2.x", projects: config.projects })
      }
      const v1 = yield* readJson(registryFile)
      if (v1 !== undefined && classifyConfigJson(v1.json) === "legacy-flat") {
        const project = yield* decodeWith(LegacyProject, registryFile, v1.json)
        sources.push({ file: registryFile, format: "1.x", projects: [project] })
      }
      return sources
    }).pipe(Effect.withSpan("Config.readLegacy"))

    const defaultsOf = (loaded: LoadedRegistry) => loaded.registry?.defaults

    const loadProjectWith = (file: string, loaded: LoadedRegistry) =>
      Effect.gen(function* () {
        const config = yield* readProjectFile(file)
        const root = path.dirname(file)
        const alias = loaded.registry?.projects.find((p) => path.resolve(p.path) === root)?.alias
        return yield* resolveProjectFile({ file, config, alias, defaults: defaultsOf(loaded) })
      })

    const loadProject = (file: string) => Effect.flatMap(readRegistry, (loaded) => loadProjectWith(file, loaded))

    const loadEntry = (loaded: LoadedRegistry, entry: RegistryEntry) =>
      loadProjectWith(path.join(entry.path, PROJECT_FILE), loaded)

    const loadLegacy = (source: LegacySource, index: number) =>
      Effect.gen(function* () {
        const legacy = source.projects[index]!
        const config = yield* decodeLegacyProject(source, index)
        const resolved = yield* resolveProjectFile({
          file: path.join(expandHome(home, legacy.sourceLocation), PROJECT_FILE),
          config,
          alias: legacy.project,
          defaults: undefined
        })
        return { ...resolved, configFile: source.file }
      })

    const reload = (project: ResolvedProject) =>
      path.basename(project.configFile) === PROJECT_FILE
        ? loadProject(project.configFile)
        : Effect.gen(function* () {
            // one legacy file holds several projects: this one is found again by its name there
            const source = (yield* readLegacy).find((s) => s.file === project.configFile)
            const index = source?.projects.findIndex((p) => p.project === project.alias) ?? -1
            if (source === undefined || index < 0) {
              return yield* new ConfigError({
                file: project.configFile,
                issues: [`project "${project.alias ?? project.name}" is no longer in it`]
              })
            }
            return yield* loadLegacy(source, index)
          })

    const describeRegistered = (loaded: LoadedRegistry, legacy: ReadonlyArray<LegacySource>) => {
      const lines = (loaded.registry?.projects ?? []).map(
        (p) => `  ${(p.alias ?? "(no alias)").padEnd(16)} ${p.path}${p.active === false ? "  (inactive)" : ""}`
      )
      if (lines.length > 0) return `Registered projects (${registryFile}):\n${lines.join("\n")}`
      if (legacy.length > 0) {
        const names = legacy.flatMap((s) => s.projects.map((p) => `  ${(p.project ?? "").padEnd(16)} ${p.sourceLocation}`))
        return `Projects in legacy config ${legacy.map((s) => s.file).join(", ")}:\n${names.join("\n")}\nRun \`sicksync migrate\` to move them to the 2.0 format.`
      }
      return `No projects are registered in ${registryFile}.`
    }

    /** Loads every project, reporting every broken one, not just the first. */
    const loadAll = <A>(items: ReadonlyArray<A>, load: (a: A) => Effect.Effect<ResolvedProject, ConfigError>) =>
      Effect.validateAll(items, load).pipe(
        Effect.mapError(([first, ...others]) => new ConfigError({ file: first!.file, issues: first!.issues, others }))
      )

    const resolve = Effect.fn("Config.resolve")(function* (request: ResolveRequest) {
      const loaded = yield* readRegistry
      const entries = loaded.registry?.projects ?? []
      // Legacy projects stand in for a registry that has not been written yet.
      const legacy = loaded.registry === undefined ? yield* readLegacy : []
      const legacyProjects = legacy.flatMap((source) => source.projects.map((project, index) => ({ source, project, index })))
      if (legacy.length > 0) {
        yield* Effect.logWarning(
          `using legacy config ${legacy.map((s) => s.file).join(", ")}; run \`sicksync migrate\` to move to .sicksync-config.json files`
        )
      }

      if (request.aliases.length > 0) {
        return yield* Effect.forEach(request.aliases, (alias): Effect.Effect<ResolvedProject, ConfigError | ProjectNotFound> => {
          const entry = entries.find((p) => p.alias === alias)
          if (entry !== undefined) return loadEntry(loaded, entry)
          const old = legacyProjects.find((l) => l.project.project === alias)
          if (old !== undefined) return loadLegacy(old.source, old.index)
          return Effect.fail(
            new ProjectNotFound({
              message: `No project with alias "${alias}".\n${describeRegistered(loaded, legacy)}`
            })
          )
        })
      }

      if (request.all) {
        const active = entries.filter((p) => p.active !== false)
        if (active.length > 0) return yield* loadAll(active, (entry) => loadEntry(loaded, entry))
        if (legacyProjects.length > 0) return yield* loadAll(legacyProjects, (l) => loadLegacy(l.source, l.index))
        return yield* new ProjectNotFound({
          message: `No active projects to sync.\n${describeRegistered(loaded, legacy)}\nRegister one with \`sicksync add <path>\` or \`sicksync init\`.`
        })
      }

      const cwd = path.resolve(request.cwd)
      if (!request.global) {
        const file = yield* findProjectFile(cwd)
        if (file !== undefined) return [yield* loadProjectWith(file, loaded)]
      }
      const inside = (root: string) => cwd === root || cwd.startsWith(root.endsWith(path.sep) ? root : root + path.sep)
      const containing = entries
        .filter((p) => inside(path.resolve(p.path)))
        .sort((a, b) => b.path.length - a.path.length)[0]
      if (containing !== undefined) return [yield* loadEntry(loaded, containing)]
      const old = legacyProjects.find((l) => inside(path.resolve(expandHome(home, l.project.sourceLocation))))
      if (old !== undefined) return [yield* loadLegacy(old.source, old.index)]
      return yield* new ProjectNotFound({
        message: [
          request.global
            ? `No registered project contains ${cwd}.`
            : `No ${PROJECT_FILE} in ${cwd} or its parents, and no registered project contains it.`,
          describeRegistered(loaded, legacy),
          "Pick one with `sicksync <alias>`, sync them all with `sicksync --all`, or create a project here with `sicksync init`."
        ].join("\n")
      })
    })

    return SyncConfig.of({
      home,
      registryFile,
      readProjectFile,
      findProjectFile,
      loadProject,
      reload,
      readRegistry,
      writeRegistry,
      readLegacy,
      resolve,
      writeJson
    })
  })

export const layer = (options: { readonly home?: string } = {}) => Layer.effect(SyncConfig, make(options))

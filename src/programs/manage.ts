/**
 * The project-management commands: init, add, remove, list, info, migrate.
 * They only touch configuration files; the registry is validated before it is changed.
 */
import { Console, Effect, Either } from "effect"
import * as fs from "node:fs/promises"
import * as path from "node:path"
import { fileURLToPath, pathToFileURL } from "node:url"
import {
  DEFAULT_EXCLUDES,
  PROJECT_FILE,
  type ProjectFile,
  type Registry,
  type RegistryEntry,
  type ResolvedProject,
  type Transport
} from "../schemas/ConfigFile.js"
import {
  ConfigError,
  decodeLegacyProject,
  decodeProjectJson,
  expandHome,
  legacyToProjectFile,
  RegistryConflict,
  resolveProjectFile,
  SyncConfig
} from "../services/Config.js"

/** Where the editor schemas shipped with the package are, as `$schema` URLs. */
export const schemaUrl = (which: "project" | "registry"): string => {
  // The bundle lives in dist/; the schemas in schema/ beside it.
  const here = path.dirname(fileURLToPath(import.meta.url))
  const root = path.basename(here) === "dist" ? path.dirname(here) : path.resolve(here, "..", "..")
  return pathToFileURL(path.join(root, "schema", `${which}.schema.json`)).href
}

const emptyRegistry = (): Registry => ({ $schema: schemaUrl("registry"), projects: [] })

/** A usable alias from a directory name. */
export const aliasFrom = (name: string): string | undefined => {
  const cleaned = name.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[-._]+/, "")
  return cleaned === "" ? undefined : cleaned
}

const checkAlias = (registry: Registry, alias: string, exceptPath?: string) => {
  const taken = registry.projects.find((p) => p.alias === alias && p.path !== exceptPath)
  return taken === undefined
    ? Effect.void
    : Effect.fail(new RegistryConflict({ message: `The alias "${alias}" is already used by ${taken.path}.` }))
}

/** The home directory's .sicksync-config.json is the registry: a project there can be neither created nor registered. */
const homeConflict = (registryFile: string) =>
  new RegistryConflict({
    message: `${registryFile} is the registry of projects, so a project cannot live in ${path.dirname(registryFile)} itself; use a subdirectory.`
  })

/** Adds (or updates the alias of) a project in the registry. Returns the entry as written. */
const register = (root: string, alias: string | undefined, explicitAlias: boolean) =>
  Effect.gen(function* () {
    const config = yield* SyncConfig
    // Writing the registry would replace the project's own file.
    if (path.join(root, PROJECT_FILE) === config.registryFile) return yield* homeConflict(config.registryFile)
    const loaded = yield* config.readRegistry
    const registry = loaded.registry ?? emptyRegistry()
    const existing = registry.projects.find((p) => path.resolve(p.path) === root)
    if (existing !== undefined && !explicitAlias) return { entry: existing, added: false }
    let chosen = alias
    if (chosen !== undefined) {
      if (explicitAlias) yield* checkAlias(registry, chosen, existing?.path)
      else if (registry.projects.some((p) => p.alias === chosen)) chosen = undefined // a default alias never steals one
    }
    const entry: RegistryEntry = { path: root, ...(chosen !== undefined ? { alias: chosen } : {}), active: existing?.active ?? true }
    const projects = existing === undefined ? [...registry.projects, entry] : registry.projects.map((p) => (p === existing ? entry : p))
    yield* config.writeRegistry({ ...registry, projects })
    return { entry, added: existing === undefined }
  })

export interface InitOptions {
  readonly cwd: string
  readonly alias: string | undefined
  readonly hostname: string
  readonly destinationLocation: string
  readonly username: string | undefined
  readonly port: number | undefined
  readonly transport: Transport | undefined
}

export const init = Effect.fn("manage.init")(function* (options: InitOptions) {
  const config = yield* SyncConfig
  const root = path.resolve(options.cwd)
  const file = path.join(root, PROJECT_FILE)
  if (file === config.registryFile) return yield* homeConflict(config.registryFile)
  // Any file: one that is not a project file (a registry, a 1.x config) must not be replaced either.
  const present = yield* Effect.promise(() => fs.access(file).then(() => true, () => false))
  if (present) {
    return yield* new RegistryConflict({ message: `${file} already exists; edit it, or register it with \`sicksync add\`.` })
  }
  const loaded = yield* config.readRegistry
  if (options.alias !== undefined && loaded.registry !== undefined) yield* checkAlias(loaded.registry, options.alias)

  const project: ProjectFile = {
    $schema: schemaUrl("project"),
    project: path.basename(root),
    destinations: [
      {
        hostname: options.hostname,
        destinationLocation: options.destinationLocation,
        ...(options.username !== undefined ? { username: options.username } : {}),
        ...(options.port !== undefined ? { port: options.port } : {}),
        ...(options.transport !== undefined ? { transport: options.transport } : {})
      }
    ],
    excludes: [...DEFAULT_EXCLUDES]
  }
  // Validate what we are about to write with the same rules as any hand-written file.
  const { config: checked } = yield* decodeProjectJson(file, project)
  yield* resolveProjectFile({ file, config: checked, alias: undefined, defaults: undefined })
  yield* config.writeJson(file, project)
  const { entry } = yield* register(root, options.alias ?? aliasFrom(path.basename(root)), options.alias !== undefined)
  yield* Console.log(`Wrote ${file}`)
  yield* Console.log(
    `Registered ${root}${entry.alias !== undefined ? ` as "${entry.alias}"` : ""} in ${config.registryFile}`
  )
})

export const add = Effect.fn("manage.add")(function* (options: { readonly path: string; readonly alias: string | undefined }) {
  const config = yield* SyncConfig
  const root = path.resolve(options.path)
  const file = path.join(root, PROJECT_FILE)
  const project = yield* config.loadProject(file)
  const { entry, added } = yield* register(root, options.alias ?? aliasFrom(project.name), options.alias !== undefined)
  const as = entry.alias !== undefined ? ` as "${entry.alias}"` : ""
  yield* Console.log(added ? `Registered ${root}${as}` : `${root} is registered${as}`)
})

export const remove = Effect.fn("manage.remove")(function* (target: string) {
  const config = yield* SyncConfig
  const loaded = yield* config.readRegistry
  const registry = loaded.registry ?? emptyRegistry()
  const asPath = path.resolve(expandHome(config.home, target))
  const entry = registry.projects.find((p) => p.alias === target) ?? registry.projects.find((p) => path.resolve(p.path) === asPath)
  if (entry === undefined) {
    return yield* new RegistryConflict({
      message: `No registered project has the alias or path "${target}". \`sicksync list\` shows them.`
    })
  }
  yield* config.writeRegistry({ ...registry, projects: registry.projects.filter((p) => p !== entry) })
  yield* Console.log(`Removed ${entry.alias ?? entry.path} from ${config.registryFile} (its ${PROJECT_FILE} is kept)`)
})

/** Columns padded to their widest cell; cells in `wide` (long error messages) do not widen theirs. */
const table = (rows: ReadonlyArray<ReadonlyArray<string>>, wide: (cell: string) => boolean = () => false): string => {
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => (wide(r[i]!) ? 0 : r[i]!.length))))
  return rows.map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join("  ")).join("\n")
}

export const list = Effect.gen(function* () {
  const config = yield* SyncConfig
  const loaded = yield* config.readRegistry
  const entries = loaded.registry?.projects ?? []
  if (entries.length === 0) {
    const legacy = yield* config.readLegacy
    const hint = legacy.length > 0 ? `\nLegacy config found (${legacy.map((l) => l.file).join(", ")}): run \`sicksync migrate\`.` : ""
    yield* Console.log(`No projects registered in ${config.registryFile}. Add one with \`sicksync init\` or \`sicksync add\`.${hint}`)
    return
  }
  const rows = yield* Effect.forEach(entries, (entry) =>
    config.loadProject(path.join(entry.path, PROJECT_FILE)).pipe(
      Effect.either,
      Effect.map((loadedProject) => [
        entry.alias ?? "-",
        entry.path,
        Either.isRight(loadedProject)
          ? loadedProject.right.destinations.map((d) => `${d.name}:${d.destinationLocation}`).join(", ")
          : `(config error: ${loadedProject.left.issues[0] ?? ""})`,
        entry.active === false ? "no" : "yes"
      ])
    )
  )
  yield* Console.log(table([["ALIAS", "PATH", "DESTINATIONS", "ACTIVE"], ...rows], (cell) => cell.startsWith("(config error: ")))
}).pipe(Effect.withSpan("manage.list"))

export const describeProject = (p: ResolvedProject): string => {
  const lines = [
    `${p.name}${p.alias !== undefined ? ` (alias ${p.alias})` : ""}`,
    `  root:            ${p.root}`,
    `  config:          ${p.configFile}`,
    `  excludes:        ${p.excludes.join(", ") || "(none)"}`,
    `  excludesFile:    ${p.excludesFile.join(", ") || "(none)"}`,
    `  followSymLinks:  ${p.followSymLinks}`,
    `  destinations:`
  ]
  for (const d of p.destinations) {
    const user = d.username !== undefined ? `${d.username}@` : ""
    const port = d.port !== undefined ? ` port ${d.port}` : ""
    lines.push(`    - ${d.name}: ${d.transport === "local" ? "local" : `${user}${d.hostname}${port}`} → ${d.destinationLocation}`)
    lines.push(`      transport ${d.transport}, websocketPort ${d.websocketPort}${d.identityFile ? `, identityFile ${d.identityFile}` : ""}`)
  }
  return lines.join("\n")
}

export const info = Effect.fn("manage.info")(function* (options: {
  readonly aliases: ReadonlyArray<string>
  readonly global: boolean
  readonly all: boolean
  readonly cwd: string
  readonly json: boolean
}) {
  const config = yield* SyncConfig
  const projects = yield* config.resolve(options)
  if (options.json) yield* Console.log(JSON.stringify(projects.length === 1 && !options.all ? projects[0] : projects, null, 2))
  else yield* Console.log(projects.map(describeProject).join("\n\n"))
})

export const migrate = Effect.gen(function* () {
  const config = yield* SyncConfig
  const sources = yield* config.readLegacy
  if (sources.length === 0) {
    yield* Console.log(`Nothing to migrate: no ~/.sicksync/config.json and no 1.x ${config.registryFile}.`)
    return
  }
  const loaded = yield* config.readRegistry
  let registry = loaded.registry ?? emptyRegistry()
  const written: Array<string> = []
  const skipped: Array<string> = []
  // Every project is checked before anything is written.
  for (const source of sources) for (let i = 0; i < source.projects.length; i++) yield* decodeLegacyProject(source, i)

  for (const source of sources) {
    if (source.format === "1.x") {
      // The 1.x file sits where the registry goes: keep a copy before the registry replaces it.
      const backup = path.join(config.home, ".sicksync-config.v1.json")
      yield* Effect.tryPromise({
        try: () => fs.copyFile(source.file, backup),
        catch: (cause) => new ConfigError({ file: backup, issues: [`cannot write the backup: ${String(cause)}`] })
      })
      written.push(`${backup} (copy of the 1.x config)`)
    }
    for (const legacy of source.projects) {
      const root = path.resolve(expandHome(config.home, legacy.sourceLocation))
      const file = path.join(root, PROJECT_FILE)
      if (file === config.registryFile) {
        skipped.push(`${legacy.project ?? root}: ${file} is the registry; move the project to a subdirectory of ${root}`)
        continue
      }
      const rootExists = yield* Effect.promise(() => fs.stat(root).then((s) => s.isDirectory(), () => false))
      if (!rootExists) {
        skipped.push(`${legacy.project ?? root}: ${root} does not exist`)
        continue
      }
      const existing = yield* config.findProjectFile(root)
      if (existing === file) {
        skipped.push(`${file}: already exists, kept as it is`)
      } else {
        yield* config.writeJson(file, { $schema: schemaUrl("project"), ...legacyToProjectFile(legacy) })
        yield* config.readProjectFile(file)
        written.push(file)
      }
      if (!registry.projects.some((p) => path.resolve(p.path) === root)) {
        const alias = legacy.project !== undefined ? aliasFrom(legacy.project) : aliasFrom(path.basename(root))
        const free = alias !== undefined && !registry.projects.some((p) => p.alias === alias)
        registry = {
          ...registry,
          projects: [...registry.projects, { path: root, ...(free ? { alias } : {}), active: true }]
        }
      }
    }
  }
  yield* config.writeRegistry(registry)
  written.push(`${config.registryFile} (${registry.projects.length} project${registry.projects.length === 1 ? "" : "s"})`)
  yield* Console.log(`Migrated ${sources.map((s) => `${s.file} (${s.format})`).join(" and ")}. Wrote:`)
  for (const w of written) yield* Console.log(`  ${w}`)
  for (const s of skipped) yield* Console.log(`Skipped: ${s}`)
  yield* Console.log("The old files were left in place.")
}).pipe(Effect.withSpan("manage.migrate"))

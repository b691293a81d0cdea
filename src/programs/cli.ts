/**
 * The command tree. Handlers only parse and delegate to programs.
 */
import * as Args from "@effect/cli/Args"
import * as Command from "@effect/cli/Command"
import * as Options from "@effect/cli/Options"
import * as Prompt from "@effect/cli/Prompt"
import { Data, Effect, Option } from "effect"
import * as path from "node:path"
import { Alias, Transport } from "../schemas/ConfigFile.js"
import { SyncConfig } from "../services/Config.js"
import { VERSION } from "../version.js"
import * as manage from "./manage.js"
import { describe, Supervisor } from "../services/Supervisor.js"
import { defaultSafety } from "./reconcile.js"
import { runOnce } from "./sync.js"
import { daemonCommand, startDaemonCommand } from "./daemonCommands.js"

/** A command line that cannot be acted on; printed as is. */
export class UsageError extends Data.TaggedError("UsageError")<{ readonly message: string }> {}

// ---- shared options ---------------------------------------------------------------------------

const all = Options.boolean("all").pipe(Options.withAlias("a"), Options.withDescription("every active project in the registry"))
const global = Options.boolean("global").pipe(
  Options.withAlias("g"),
  Options.withDescription("use the global registry (~/.sicksync-config.json), not the project file found from here")
)
/** Aliases look like names; a mistyped flag (`--al`) must not be taken for one. */
const aliases = Args.text({ name: "alias" }).pipe(
  Args.withSchema(Alias),
  Args.withDescription("project alias from the registry"),
  Args.repeated
)

const noDelete = Options.boolean("no-delete").pipe(Options.withDescription("never delete anything on the destinations"))
const force = Options.boolean("force").pipe(
  Options.withDescription("allow a reconciliation to delete more than half of a destination")
)

const cwd = Effect.sync(() => process.cwd())

// ---- sicksync [alias...] ----------------------------------------------------------------------

const root = Command.make("sicksync", { aliases, all, global, noDelete, force }, (options) =>
  Effect.gen(function* () {
    const config = yield* SyncConfig
    const projects = yield* config.resolve({ ...options, cwd: yield* cwd })
    const supervisor = yield* Supervisor
    if (projects.length > 1) yield* Effect.log(`syncing ${projects.length} projects:\n${describe(projects)}`)
    yield* supervisor.run(projects, { noDelete: options.noDelete, safety: { ...defaultSafety, force: options.force } })
  })
).pipe(Command.withDescription("Mirror a project onto its destinations as you edit it"))

// ---- once -------------------------------------------------------------------------------------

const once = Command.make(
  "once",
  {
    aliases,
    all,
    global,
    noDelete,
    force,
    dryRun: Options.boolean("dry-run").pipe(Options.withDescription("print what would be sent and deleted; change nothing"))
  },
  (options) =>
    Effect.gen(function* () {
      const config = yield* SyncConfig
      const projects = yield* config.resolve({ ...options, cwd: yield* cwd })
      yield* runOnce(projects, options)
    })
).pipe(Command.withDescription("Bring every destination fully up to date once (a big sync), then exit"))

// ---- init -------------------------------------------------------------------------------------

const optionalText = (name: string, description: string) =>
  Options.text(name).pipe(Options.withDescription(description), Options.optional)

const init = Command.make(
  "init",
  {
    alias: Options.text("alias").pipe(
      Options.withSchema(Alias),
      Options.withDescription("alias in the registry (default: the directory's name)"),
      Options.optional
    ),
    host: optionalText("host", "destination hostname (or a Host from ~/.ssh/config)"),
    dest: optionalText("dest", "destination directory on the remote: absolute or ~/…"),
    user: optionalText("user", "SSH user name"),
    port: Options.integer("port").pipe(Options.withDescription("SSH port"), Options.optional),
    transport: Options.choice("transport", Transport.literals).pipe(
      Options.withDescription("ssh (default) or local (a directory on this machine)"),
      Options.optional
    )
  },
  (o) =>
    Effect.gen(function* () {
      const dir = yield* cwd
      const interactive = process.stdin.isTTY === true
      const ask = (value: Option.Option<string>, flag: string, message: string, fallback?: string) =>
        Option.match(value, {
          onSome: Effect.succeed,
          onNone: () =>
            interactive
              ? Prompt.text({ message, ...(fallback !== undefined ? { default: fallback } : {}) }).pipe(Prompt.run)
              : Effect.fail(new UsageError({ message: `sicksync init: --${flag} is required (stdin is not a terminal to ask on)` }))
        })
      const hostname = yield* ask(o.host, "host", "Destination host (hostname or ~/.ssh/config Host)")
      const destinationLocation = yield* ask(
        o.dest,
        "dest",
        "Destination directory on that host (absolute or ~/...)",
        `~/${path.basename(dir)}`
      )
      yield* manage.init({
        cwd: dir,
        alias: Option.getOrUndefined(o.alias),
        hostname,
        destinationLocation,
        username: Option.getOrUndefined(o.user),
        port: Option.getOrUndefined(o.port),
        transport: Option.getOrUndefined(o.transport)
      })
    })
).pipe(Command.withDescription("Create .sicksync-config.json here and register the project"))

// ---- add / remove / list / info / migrate -----------------------------------------------------

const add = Command.make(
  "add",
  {
    path: Args.directory({ name: "path", exists: "yes" }).pipe(Args.withDescription("project directory (default: .)"), Args.optional),
    alias: Options.text("alias").pipe(Options.withSchema(Alias), Options.withDescription("alias in the registry"), Options.optional)
  },
  (o) =>
    Effect.gen(function* () {
      yield* manage.add({ path: Option.getOrElse(o.path, () => process.cwd()), alias: Option.getOrUndefined(o.alias) })
    })
).pipe(Command.withDescription("Register an existing project (its .sicksync-config.json) in the registry"))

const remove = Command.make(
  "remove",
  { target: Args.text({ name: "alias|path" }).pipe(Args.withDescription("alias or path of a registered project")) },
  ({ target }) => manage.remove(target)
).pipe(Command.withDescription("Unregister a project (its files are kept)"))

const list = Command.make("list", {}, () => manage.list).pipe(Command.withDescription("List registered projects"))

const info = Command.make(
  "info",
  { aliases, all, global, json: Options.boolean("json").pipe(Options.withDescription("print JSON")) },
  (o) => Effect.flatMap(cwd, (dir) => manage.info({ ...o, cwd: dir }))
).pipe(Command.withDescription("Show the fully resolved configuration"))

const migrate = Command.make("migrate", {}, () => manage.migrate).pipe(
  Command.withDescription("Write project files and registry entries from a 1.x/2.x/3.x configuration")
)

export const command = root.pipe(
  Command.withSubcommands([once, init, add, remove, list, info, migrate, daemonCommand, startDaemonCommand])
)

export const cli = Command.run(command, { name: "sicksync", version: VERSION })

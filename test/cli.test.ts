/**
 * The management CLI end to end: the built bundle (dist/sicksync.mjs) run as a child process with a
 * temporary $HOME, temporary project directories as cwd and stdin that is not a terminal.
 */
import { JSONSchema, type Schema } from "effect"
import { spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath, pathToFileURL } from "node:url"
import { beforeAll, describe, expect, it } from "vitest"
import { ProjectFile, Registry } from "../src/schemas/ConfigFile.js"
import { bundle, ensureBundle } from "./support/cli.js"
import { mkdir, tempDirs, writeFile } from "./support/fixtures.js"

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
const BIN = bundle
const PROJECT_FILE = ".sicksync-config.json"
const PROJECT_SCHEMA_URL = pathToFileURL(path.join(ROOT, "schema", "project.schema.json")).href
const REGISTRY_SCHEMA_URL = pathToFileURL(path.join(ROOT, "schema", "registry.schema.json")).href
const PICK_HINT = "Pick one with `sicksync <alias>`, sync them all with `sicksync --all`, or create a project here with `sicksync init`."

beforeAll(() => ensureBundle(), 120_000)

const tmp = tempDirs("sicksync-cli-")

const writeProject = (root: string, value: unknown) => writeFile(path.join(root, PROJECT_FILE), value)
const readJson = (file: string): unknown => JSON.parse(fs.readFileSync(file, "utf8"))
const registryOf = (home: string) => path.join(home, PROJECT_FILE)
const VERSION = (readJson(path.join(ROOT, "package.json")) as { version: string }).version

interface Run {
  readonly status: number | null
  readonly stdout: string
  readonly stderr: string
}

/** `sicksync ...args` in `cwd` with HOME=`home`; stdin is an empty pipe, not a terminal. */
const sicksync = (home: string, cwd: string, ...args: Array<string>): Run => {
  const env: Record<string, string | undefined> = { ...process.env, HOME: home }
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd, env, encoding: "utf8", input: "", timeout: 30_000 })
  return { status: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** A user error: exit code 1, nothing on stdout, exactly `error: <message>` on stderr, no stack trace. */
const expectUserError = (r: Run, message: string) => {
  expect(r.stderr).toBe(`error: ${message}\n`)
  expect(r.stderr).not.toMatch(/^\s+at /m)
  expect(r.stdout).toBe("")
  expect(r.status).toBe(1)
}

const project = (hostname: string, destinationLocation: string, extra: Record<string, unknown> = {}) => ({
  destinations: [{ hostname, destinationLocation }],
  ...extra
})

// ---- basics -----------------------------------------------------------------------------------

describe("sicksync --version / --help / --completions", () => {
  it("--version prints the package.json version", () => {
    const r = sicksync(tmp(), os.tmpdir(), "--version")
    expect(r.stdout.trim()).toBe(VERSION)
    expect(r.stderr).toBe("")
    expect(r.status).toBe(0)
  })

  it("--help lists the commands and exits 0", () => {
    const r = sicksync(tmp(), os.tmpdir(), "--help")
    expect(r.status).toBe(0)
    for (const word of ["--all", "--global", "init", "add", "remove", "list", "info", "migrate", "--json", "--transport"]) {
      expect(r.stdout).toContain(word)
    }
    expect(r.stderr).toBe("")
  })

  it("--completions bash prints a bash completion script", () => {
    const r = sicksync(tmp(), os.tmpdir(), "--completions", "bash")
    expect(r.status).toBe(0)
    expect(r.stdout).toMatch(/^complete -F \S+ .*sicksync$/m)
    expect(r.stderr).toBe("")
  })
})

describe("the launcher's code cache", () => {
  /** `sicksync --version` (in `cwd`, with HOME and XDG_CACHE_HOME as given) prints the version and nothing else. */
  const versionIn = (env: { readonly HOME: string; readonly XDG_CACHE_HOME: string }, cwd = os.tmpdir()) => {
    const r = spawnSync(process.execPath, [BIN, "--version"], { cwd, env: { ...process.env, ...env }, encoding: "utf8", input: "", timeout: 30_000 })
    expect({ status: r.status, stdout: r.stdout.trim(), stderr: r.stderr }).toEqual({ status: 0, stdout: VERSION, stderr: "" })
  }
  /** The same with its code cache in `cache`. */
  const versionWith = (cache: string) => versionIn({ HOME: tmp(), XDG_CACHE_HOME: cache })
  const cachesIn = (dir: string) => fs.readdirSync(dir).filter((name) => name.endsWith(".v8"))
  const old = new Date("2000-01-01T00:00:00Z")

  it("is written on the first run, private, and used as it is afterwards; other builds' stale caches go", () => {
    const cache = tmp()
    const dir = path.join(cache, "sicksync")
    fs.mkdirSync(dir)
    writeFile(path.join(dir, "stale-v8-1-x64.v8"), "")
    fs.utimesSync(path.join(dir, "stale-v8-1-x64.v8"), old, new Date(Date.now() - 60 * 24 * 3600 * 1000))
    writeFile(path.join(dir, "recent-v8-1-x64.v8"), "")
    writeFile(path.join(dir, "cut-short.v8.123.tmp"), "")
    fs.utimesSync(path.join(dir, "cut-short.v8.123.tmp"), old, new Date(Date.now() - 2 * 3600 * 1000))
    versionWith(cache)
    expect(fs.existsSync(path.join(dir, "cut-short.v8.123.tmp"))).toBe(false)
    const [mine, ...others] = cachesIn(dir).filter((name) => name !== "recent-v8-1-x64.v8")
    expect(others).toEqual([])
    expect(cachesIn(dir)).toContain("recent-v8-1-x64.v8")
    const file = path.join(dir, mine!)
    expect(fs.statSync(file).size).toBeGreaterThan(100_000)
    expect(fs.statSync(file).mode & 0o777).toBe(0o600)
    // Accepted the next time, so not written again.
    fs.utimesSync(file, old, old)
    versionWith(cache)
    expect(fs.statSync(file).mtimeMs).toBe(old.getTime())
    // However old, this build's caches stay when another is written: its daemon's is rewritten only when refused.
    const daemons = path.join(dir, mine!.replace("-v8-", "-daemon-v8-"))
    writeFile(daemons, "")
    fs.utimesSync(daemons, old, old)
    fs.writeFileSync(file, Buffer.alloc(4096, 7))
    versionWith(cache)
    expect(fs.statSync(file).size).toBeGreaterThan(100_000)
    expect(fs.existsSync(daemons)).toBe(true)
  })

  it("the daemon's is its own, written as it starts, and not again when it ends (a long run's exit leaves a poorer cache)", async () => {
    const cache = tmp()
    const home = tmp()
    const daemon = spawn(process.execPath, [BIN, "daemon", "--port", "0", "--grace-ms", "60000"], {
      env: { ...process.env, HOME: home, XDG_CACHE_HOME: cache },
      stdio: "ignore"
    })
    const exited = new Promise((resolve) => daemon.once("exit", resolve))
    try {
      const dir = path.join(cache, "sicksync")
      const state = path.join(home, ".sicksync", "daemon.json")
      const deadline = Date.now() + 20_000
      while (!(fs.existsSync(state) && fs.existsSync(dir) && cachesIn(dir).length === 1) && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 25))
      }
      // The daemon is up and serving, and its cache is already there, apart from a client's.
      expect(fs.existsSync(state)).toBe(true)
      expect(fs.existsSync(dir) && cachesIn(dir)).toHaveLength(1)
      expect(cachesIn(dir)[0]).toMatch(/^[0-9a-f]{16}-daemon-v8-/)
      const file = path.join(dir, cachesIn(dir)[0]!)
      expect(fs.statSync(file).size).toBeGreaterThan(100_000)
      const before = fs.statSync(file)
      // A clean exit leaves it as it is.
      daemon.kill("SIGTERM")
      await exited
      expect(fs.existsSync(state)).toBe(false)
      const after = fs.statSync(file)
      expect({ ino: after.ino, mtimeMs: after.mtimeMs, size: after.size }).toEqual({ ino: before.ino, mtimeMs: before.mtimeMs, size: before.size })
    } finally {
      daemon.kill("SIGKILL")
      await exited
    }
  }, 30_000)

  it("holds the code its first run ran: a first `info` leaves a larger cache than a first `--version`", () => {
    const project = tmp()
    writeFile(
      path.join(project, ".sicksync-config.json"),
      JSON.stringify({ project: "p", destinations: [{ name: "d", hostname: "localhost", destinationLocation: path.join(project, "dest"), transport: "local" }] })
    )
    const sizeAfter = (args: ReadonlyArray<string>) => {
      const cache = tmp()
      // only the write at the end: a loaded machine must not make the run outlast the 2 s
      const env = { ...process.env, HOME: tmp(), XDG_CACHE_HOME: cache, SICKSYNC_CACHE_AFTER_MS: "600000" }
      const r = spawnSync(process.execPath, [BIN, ...args], { cwd: project, env, encoding: "utf8", timeout: 30_000 })
      expect(r.status, r.stderr).toBe(0)
      const dir = path.join(cache, "sicksync")
      expect(fs.existsSync(dir) ? cachesIn(dir) : [], `a cache after ${args.join(" ")}`).toHaveLength(1)
      return fs.statSync(path.join(dir, cachesIn(dir)[0]!)).size
    }
    // Written as soon as the program had started, both held the same start-up code (1,628,216 and
    // 1,628,328 bytes); written at their end, `info` adds its config and excludes code (~60 KB).
    expect(sizeAfter(["info"])).toBeGreaterThan(sizeAfter(["--version"]) + 20_000)
  })

  it("a long-running client writes its own a moment into the run (in place of one V8 refused), not again when it ends; the next short run writes a whole one", async () => {
    const project = tmp()
    const cache = tmp()
    writeFile(
      path.join(project, ".sicksync-config.json"),
      JSON.stringify({ project: "p", destinations: [{ name: "d", hostname: "localhost", destinationLocation: path.join(tmp(), "dest"), transport: "local", websocketPort: 0 }] })
    )
    const home = tmp()
    const dir = path.join(cache, "sicksync")
    const mine = () => (fs.existsSync(dir) ? cachesIn(dir).filter((name) => !name.includes("-daemon-")) : [])
    // A whole cache V8 refuses (a corrupt one here; another V8's flags would do the same) is as good as none.
    versionIn({ HOME: home, XDG_CACHE_HOME: cache })
    const refused = path.join(dir, mine()[0]!)
    fs.writeFileSync(refused, Buffer.alloc(4096, 7))
    const client = spawn(process.execPath, [BIN], {
      cwd: project,
      env: { ...process.env, HOME: home, XDG_CACHE_HOME: cache, SICKSYNC_CACHE_AFTER_MS: "300" },
      stdio: "ignore"
    })
    const exited = new Promise((resolve) => client.once("exit", resolve))
    try {
      const daemons = () => (fs.existsSync(dir) ? cachesIn(dir).filter((name) => name.includes("-daemon-")) : [])
      const midRun = () => mine().filter((name) => name.endsWith("-midrun.v8"))
      const deadline = Date.now() + 20_000
      while ((midRun().length === 0 || daemons().length === 0) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25))
      expect(fs.existsSync(refused)).toBe(false)
      // Written while the client runs; the local daemon it started has its own beside it.
      expect(daemons()).toHaveLength(1)
      expect(client.exitCode).toBe(null)
      expect(mine()).toHaveLength(1)
      const before = fs.statSync(path.join(dir, mine()[0]!))
      expect(before.size).toBeGreaterThan(100_000)
      client.kill("SIGTERM")
      await exited
      const after = fs.statSync(path.join(dir, mine()[0]!))
      expect({ ino: after.ino, mtimeMs: after.mtimeMs }).toEqual({ ino: before.ino, mtimeMs: before.mtimeMs })
      expect(mine()[0]).toMatch(/-midrun\.v8$/)
      // A short run starting from it writes a whole one at its exit (what it loaded, and what it ran) in its place…
      const short = () => {
        const env = { ...process.env, HOME: home, XDG_CACHE_HOME: cache, SICKSYNC_CACHE_AFTER_MS: "600000" }
        const r = spawnSync(process.execPath, [BIN, "info"], { cwd: project, env, encoding: "utf8", timeout: 30_000 })
        expect(r.status, r.stderr).toBe(0)
      }
      short()
      expect(mine()).toHaveLength(1)
      expect(mine()[0]).not.toMatch(/-midrun\.v8$/)
      const whole = fs.statSync(path.join(dir, mine()[0]!))
      expect(whole.size).toBeGreaterThanOrEqual(after.size)
      // …which later runs use as it is.
      short()
      expect(fs.statSync(path.join(dir, mine()[0]!)).mtimeMs).toBe(whole.mtimeMs)
    } finally {
      client.kill("SIGKILL")
      await exited
      const state = path.join(home, ".sicksync", "daemon.json")
      if (fs.existsSync(state)) process.kill(JSON.parse(fs.readFileSync(state, "utf8")).pid, "SIGTERM")
    }
  }, 30_000)

  it("a corrupt cache is replaced, and a cache that cannot be written is done without", () => {
    const cache = tmp()
    versionWith(cache)
    const dir = path.join(cache, "sicksync")
    const file = path.join(dir, cachesIn(dir)[0]!)
    fs.writeFileSync(file, Buffer.alloc(4096, 7))
    versionWith(cache)
    expect(fs.statSync(file).size).toBeGreaterThan(100_000)
    const notADirectory = path.join(tmp(), "file")
    fs.writeFileSync(notADirectory, "")
    versionWith(notADirectory)
  })

  it("is never written relative to the working directory, nor into a home that does not exist", () => {
    const cwd = tmp()
    const gone = path.join(cwd, "gone")
    for (const env of [{ HOME: "", XDG_CACHE_HOME: "" }, { HOME: "", XDG_CACHE_HOME: "relative" }, { HOME: gone, XDG_CACHE_HOME: "" }]) {
      versionIn(env, cwd)
    }
    expect(fs.readdirSync(cwd)).toEqual([])
  })
})

describe("editor JSON Schemas", () => {
  it("are shipped, parse as JSON and equal what the Schemas generate now", () => {
    const schemas: ReadonlyArray<readonly [string, Schema.Schema.AnyNoContext]> = [
      ["project", ProjectFile],
      ["registry", Registry]
    ]
    for (const [name, schema] of schemas) {
      const file = path.join(ROOT, "schema", `${name}.schema.json`)
      expect(fs.existsSync(file)).toBe(true)
      const shipped = readJson(file)
      expect(shipped).toEqual(JSON.parse(JSON.stringify(JSONSchema.make(schema))))
      expect(shipped).toMatchObject({ $schema: "http://json-schema.org/draft-07/schema#" })
    }
  })
})

// ---- init -------------------------------------------------------------------------------------

describe("sicksync init", () => {
  it("without --host/--dest and no terminal: fails clearly and writes nothing", () => {
    const home = tmp()
    const dir = mkdir(home, "app")
    expectUserError(sicksync(home, dir), `No ${PROJECT_FILE} in ${dir} or its parents, and no registered project contains it.\nNo projects are registered in ${registryOf(home)}.\n${PICK_HINT}`)
    expectUserError(sicksync(home, dir, "init"), "sicksync init: --host is required (stdin is not a terminal to ask on)")
    expectUserError(sicksync(home, dir, "init", "--host", "box"), "sicksync init: --dest is required (stdin is not a terminal to ask on)")
    expect(fs.readdirSync(dir)).toEqual([])
    // ~/.cache holds the launcher's compiled code, nothing of the user's
    expect(fs.readdirSync(home).filter((name) => name !== ".cache")).toEqual(["app"])
  })

  it("writes the project file with $schema and registers it", () => {
    const home = tmp()
    const dir = mkdir(home, "code", "my app")
    const r = sicksync(home, dir, "init", "--alias", "app", "--host", "box", "--dest", "~/app", "--user", "joe", "--port", "2222", "--transport", "ssh")
    expect(r.stdout).toBe(`Wrote ${path.join(dir, PROJECT_FILE)}\nRegistered ${dir} as "app" in ${registryOf(home)}\n`)
    expect(r.stderr).toBe("")
    expect(r.status).toBe(0)
    expect(readJson(path.join(dir, PROJECT_FILE))).toEqual({
      $schema: PROJECT_SCHEMA_URL,
      project: "my app",
      destinations: [{ hostname: "box", destinationLocation: "~/app", username: "joe", port: 2222, transport: "ssh" }],
      excludes: [".git", ".idea", "*.swp", ".svn"]
    })
    expect(fs.existsSync(fileURLToPath(PROJECT_SCHEMA_URL))).toBe(true)
    expect(readJson(registryOf(home))).toEqual({ $schema: REGISTRY_SCHEMA_URL, projects: [{ path: dir, alias: "app", active: true }] })
    expect(fs.existsSync(fileURLToPath(REGISTRY_SCHEMA_URL))).toBe(true)

    // A second init in the same directory refuses to overwrite.
    const before = fs.readFileSync(path.join(dir, PROJECT_FILE), "utf8")
    expectUserError(
      sicksync(home, dir, "init", "--host", "other", "--dest", "/x"),
      `${path.join(dir, PROJECT_FILE)} already exists; edit it, or register it with \`sicksync add\`.`
    )
    expect(fs.readFileSync(path.join(dir, PROJECT_FILE), "utf8")).toBe(before)
  })

  it("defaults the alias to the directory name, and never takes one already used", () => {
    const home = tmp()
    const first = mkdir(home, "a", "web")
    const second = mkdir(home, "b", "web")
    expect(sicksync(home, first, "init", "--host", "h", "--dest", "/srv/web", "--transport", "local").stdout).toBe(
      `Wrote ${path.join(first, PROJECT_FILE)}\nRegistered ${first} as "web" in ${registryOf(home)}\n`
    )
    const r = sicksync(home, second, "init", "--host", "h", "--dest", "/srv/web2")
    expect(r.stdout).toBe(`Wrote ${path.join(second, PROJECT_FILE)}\nRegistered ${second} in ${registryOf(home)}\n`)
    expect(r.status).toBe(0)
    expect(readJson(path.join(first, PROJECT_FILE))).toMatchObject({
      destinations: [{ hostname: "h", destinationLocation: "/srv/web", transport: "local" }]
    })
    expect(readJson(registryOf(home))).toEqual({
      $schema: REGISTRY_SCHEMA_URL,
      projects: [
        { path: first, alias: "web", active: true },
        { path: second, active: true }
      ]
    })
  })

  it("refuses a duplicate --alias or an invalid destination before writing anything", () => {
    const home = tmp()
    const registry = writeFile(registryOf(home), { projects: [{ path: "/elsewhere", alias: "taken" }] })
    const before = fs.readFileSync(registry, "utf8")
    const dir = mkdir(home, "app")
    expectUserError(sicksync(home, dir, "init", "--alias", "taken", "--host", "h", "--dest", "/x"), `The alias "taken" is already used by /elsewhere.`)
    expectUserError(
      sicksync(home, dir, "init", "--host", "h", "--dest", "relative/dir"),
      `${path.join(dir, PROJECT_FILE)}: destinations.0.destinationLocation: expected an absolute path or one starting with ~/, got "relative/dir"`
    )
    expectUserError(
      sicksync(home, dir, "init", "--host", "h", "--dest", "/x", "--port", "70000"),
      `${path.join(dir, PROJECT_FILE)}: destinations.0.port: expected an integer between 1 and 65535, got 70000`
    )
    expect(fs.readdirSync(dir)).toEqual([])
    expect(fs.readFileSync(registry, "utf8")).toBe(before)
  })

  it("refuses to create a project in $HOME, whose .sicksync-config.json is the registry", () => {
    const home = tmp()
    const registry = writeFile(registryOf(home), { projects: [{ path: "/elsewhere", alias: "x" }] })
    const before = fs.readFileSync(registry, "utf8")
    expectUserError(
      sicksync(home, home, "init", "--host", "h", "--dest", "/x"),
      `${registry} is the registry of projects, so a project cannot live in ${home} itself; use a subdirectory.`
    )
    expect(fs.readFileSync(registry, "utf8")).toBe(before)
  })
})

// ---- add / remove / list ----------------------------------------------------------------------

describe("sicksync add / remove / list", () => {
  it("add validates the project file before registering it", () => {
    const home = tmp()
    const dir = mkdir(home, "app")
    const file = writeProject(dir, { destinations: [{ hostname: "h", destinationLocation: "/x", port: "abc" }] })
    expectUserError(sicksync(home, home, "add", dir), `${file}: destinations.0.port: expected an integer between 1 and 65535, got "abc"`)
    expectUserError(sicksync(home, home, "add", mkdir(home, "empty")), `${path.join(home, "empty", PROJECT_FILE)}: no such file`)
    expect(fs.existsSync(registryOf(home))).toBe(false)
  })

  it("add registers (alias from the project name), reports an existing entry, changes and refuses aliases", () => {
    const home = tmp()
    const app = mkdir(home, "code", "app")
    const api = mkdir(home, "code", "api")
    writeProject(app, project("h", "/srv/app", { project: "My App" }))
    writeProject(api, project("h", "/srv/api"))

    let r = sicksync(home, path.join(home, "code"), "add", "app")
    expect([r.status, r.stdout, r.stderr]).toEqual([0, `Registered ${app} as "My-App"\n`, ""])
    r = sicksync(home, app, "add")
    expect([r.status, r.stdout, r.stderr]).toEqual([0, `${app} is registered as "My-App"\n`, ""])
    r = sicksync(home, api, "add", "--alias", "backend")
    expect([r.status, r.stdout, r.stderr]).toEqual([0, `Registered ${api} as "backend"\n`, ""])
    r = sicksync(home, home, "add", app, "--alias", "front")
    expect([r.status, r.stdout, r.stderr]).toEqual([0, `${app} is registered as "front"\n`, ""])
    expectUserError(sicksync(home, home, "add", app, "--alias", "backend"), `The alias "backend" is already used by ${api}.`)

    expect(readJson(registryOf(home))).toEqual({
      $schema: REGISTRY_SCHEMA_URL,
      projects: [
        { path: app, alias: "front", active: true },
        { path: api, alias: "backend", active: true }
      ]
    })
  })

  it("add: a path that does not exist is refused by the argument parser", () => {
    const home = tmp()
    const r = sicksync(home, home, "add", path.join(home, "nope"))
    expect(r.status).toBe(1)
    expect(r.stdout).toBe("")
    expect(r.stderr.trim()).toBe(`Path '${path.join(home, "nope")}' must exist`)
  })

  it("add refuses $HOME: registering it would replace its project file with the registry", () => {
    const home = tmp()
    const file = writeProject(home, project("h", "/x"))
    const before = fs.readFileSync(file, "utf8")
    expectUserError(
      sicksync(home, home, "add", home),
      `${file} is the registry of projects, so a project cannot live in ${home} itself; use a subdirectory.`
    )
    expect(fs.readFileSync(file, "utf8")).toBe(before)
  })

  it("list shows every registered project, broken ones included; remove by alias and by path", () => {
    const home = tmp()
    expect(sicksync(home, home, "list")).toEqual({
      status: 0,
      stdout: `No projects registered in ${registryOf(home)}. Add one with \`sicksync init\` or \`sicksync add\`.\n`,
      stderr: ""
    })
    const web = mkdir(home, "web")
    const api = mkdir(home, "api")
    const bad = mkdir(home, "bad")
    writeProject(web, { destinations: [{ hostname: "a", destinationLocation: "/w" }, { hostname: "b", destinationLocation: "~/w" }] })
    writeProject(api, { destinations: [{ hostname: "a", destinationLocation: "/1" }, { hostname: "a", destinationLocation: "/2" }] })
    writeProject(bad, { destinations: [] })
    writeFile(registryOf(home), {
      projects: [
        { path: web, alias: "web" },
        { path: api, alias: "api", active: false },
        { path: bad }
      ]
    })
    const pad = (s: string, n: number) => s.padEnd(n)
    const w = Math.max(...[web, api, bad].map((p) => p.length))
    const r = sicksync(home, home, "list")
    expect(r.stdout).toBe(
      [
        // the error message does not widen the DESTINATIONS column
        `ALIAS  ${pad("PATH", w)}  ${pad("DESTINATIONS", 16)}  ACTIVE`,
        `web    ${pad(web, w)}  ${pad("a:/w, b:~/w", 16)}  yes`,
        `api    ${pad(api, w)}  ${pad("a:/1:/1, a:/2:/2", 16)}  no`,
        `-      ${pad(bad, w)}  (config error: destinations: expected a non-empty list of destinations, got [])  yes`,
        ""
      ].join("\n")
    )
    expect(r.stderr).toBe("")
    expect(r.status).toBe(0)

    let removed = sicksync(home, home, "remove", "web")
    expect(removed).toEqual({ status: 0, stdout: `Removed web from ${registryOf(home)} (its ${PROJECT_FILE} is kept)\n`, stderr: "" })
    removed = sicksync(home, home, "remove", "~/bad")
    expect(removed).toEqual({ status: 0, stdout: `Removed ${bad} from ${registryOf(home)} (its ${PROJECT_FILE} is kept)\n`, stderr: "" })
    expectUserError(sicksync(home, home, "remove", "web"), `No registered project has the alias or path "web". \`sicksync list\` shows them.`)
    expect((readJson(registryOf(home)) as { projects: unknown }).projects).toEqual([{ path: api, alias: "api", active: false }])
    expect(fs.existsSync(path.join(web, PROJECT_FILE))).toBe(true)
  })
})

// ---- info: resolution -------------------------------------------------------------------------

/** $HOME with a registry: web (active, nested unregistered project inside), api (inactive). */
const setUp = () => {
  const home = tmp()
  const web = mkdir(home, "code", "web")
  const api = mkdir(home, "code", "api")
  const inner = mkdir(web, "tools", "inner")
  writeProject(web, {
    project: "web",
    destinations: [
      { hostname: "box", destinationLocation: "/srv/web", username: "joe", port: 2222 },
      { hostname: "box", destinationLocation: "~/mirror", transport: "local", identityFile: "~/.ssh/k" }
    ],
    excludesFile: "conf/ignore"
  })
  writeProject(api, project("api-host", "/srv/api"))
  writeProject(inner, project("inner-host", "/srv/inner"))
  writeFile(registryOf(home), {
    projects: [
      { path: web, alias: "web" },
      { path: api, alias: "api", active: false }
    ],
    defaults: { websocketPort: 7000 }
  })
  return { home, web, api, inner }
}

describe("sicksync info", () => {
  it("from a nested subdirectory: the project and its resolved settings", () => {
    const { home, web } = setUp()
    const r = sicksync(home, mkdir(web, "src", "deep"), "info")
    expect(r.stdout).toBe(
      [
        "web (alias web)",
        `  root:            ${web}`,
        `  config:          ${path.join(web, PROJECT_FILE)}`,
        "  excludes:        .git, .idea, *.swp, .svn",
        `  excludesFile:    ${path.join(web, "conf", "ignore")}`,
        "  followSymLinks:  false",
        "  destinations:",
        "    - box:/srv/web: joe@box port 2222 → /srv/web",
        "      transport ssh, websocketPort 7000",
        "    - box:~/mirror: local → ~/mirror",
        "      transport local, websocketPort 7000, identityFile ~/.ssh/k",
        ""
      ].join("\n")
    )
    expect(r.stderr).toBe("")
    expect(r.status).toBe(0)
  })

  it("--json prints the resolved project", () => {
    const { home, web } = setUp()
    const r = sicksync(home, mkdir(web, "src"), "info", "--json")
    expect(r.status).toBe(0)
    expect(r.stderr).toBe("")
    expect(JSON.parse(r.stdout)).toEqual({
      name: "web",
      alias: "web",
      root: web,
      configFile: path.join(web, PROJECT_FILE),
      destinations: [
        { name: "box:/srv/web", hostname: "box", destinationLocation: "/srv/web", username: "joe", port: 2222, websocketPort: 7000, transport: "ssh" },
        { name: "box:~/mirror", hostname: "box", destinationLocation: "~/mirror", identityFile: "~/.ssh/k", websocketPort: 7000, transport: "local" }
      ],
      excludes: [".git", ".idea", "*.swp", ".svn"],
      excludesFile: [path.join(web, "conf", "ignore")],
      followSymLinks: false
    })
  })

  it("aliases, -g and --all", () => {
    const { home, web, api, inner } = setUp()
    const roots = (r: Run) => {
      expect(r.stderr).toBe("")
      expect(r.status).toBe(0)
      const json = JSON.parse(r.stdout) as { root: string } | Array<{ root: string }>
      return Array.isArray(json) ? json.map((p) => p.root) : json.root
    }
    expect(roots(sicksync(home, home, "info", "api", "web", "--json"))).toEqual([api, web])
    expect(roots(sicksync(home, inner, "info", "--json"))).toBe(inner)
    expect(roots(sicksync(home, inner, "info", "-g", "--json"))).toBe(web)
    expect(roots(sicksync(home, home, "info", "--all", "--json"))).toEqual([web])
  })

  it("says what is registered and how to pick one when nothing matches", () => {
    const { home, web, api } = setUp()
    const listing = [`Registered projects (${registryOf(home)}):`, `  ${"web".padEnd(16)} ${web}`, `  ${"api".padEnd(16)} ${api}  (inactive)`].join("\n")
    const outside = mkdir(home, "outside")
    expectUserError(
      sicksync(home, outside, "info"),
      `No ${PROJECT_FILE} in ${outside} or its parents, and no registered project contains it.\n${listing}\n${PICK_HINT}`
    )
    expectUserError(sicksync(home, outside, "info", "nope"), `No project with alias "nope".\n${listing}`)
  })

  it("unknown keys: one warning on stderr, the JSON on stdout intact", () => {
    const home = tmp()
    const dir = mkdir(home, "app")
    const file = writeProject(dir, { ...project("h", "/x"), colour: "red" })
    const r = sicksync(home, dir, "info", "--json")
    expect(r.stderr).toBe(`warning: ${file}: colour: unknown key, ignored\n`)
    expect(JSON.parse(r.stdout)).toMatchObject({ name: "app", root: dir })
    expect(r.status).toBe(0)
  })

  it("config errors: file, JSON path, expected and found; once; exit 1; no stack trace — also for the root command", () => {
    const home = tmp()
    const dir = mkdir(home, "app")
    const file = writeProject(dir, { destinations: [{ hostname: "h", destinationLocation: "/x", port: "abc" }] })
    const message = `${file}: destinations.0.port: expected an integer between 1 and 65535, got "abc"`
    expectUserError(sicksync(home, mkdir(dir, "sub"), "info"), message)
    const root = sicksync(home, dir)
    expect(root.status).toBe(1)
    expect(root.stderr.split(message).length - 1).toBe(1)
    expect(root.stderr).not.toMatch(/^\s+at /m)

    writeFile(file, `{\n  "destinations": [\n    { "hostname": "h", "destinationLocation": "/x" }\n  ]\n`)
    expectUserError(sicksync(home, dir, "info"), `${file}: invalid JSON at line 5, column 1: expected '}'`)
  })

  it("a duplicate alias in the registry is a config error naming both entries", () => {
    const home = tmp()
    const registry = writeFile(registryOf(home), { projects: [{ path: "/a", alias: "x" }, { path: "/b", alias: "x" }] })
    expectUserError(sicksync(home, home, "info", "x"), `${registry}: projects.1.alias: "x" is already the alias of projects.0`)
    expect(sicksync(home, home, "x").status).toBe(1)
  })
})

// ---- migrate and legacy configurations ---------------------------------------------------------

/** A 2.x/3.x `~/.sicksync/config.json`: a (as ~/code/a), b (absolute) and a project whose directory is gone. */
const legacyV2 = (home: string, b: string) => ({
  debug: true,
  retryOnDisconnect: true,
  prefersEncrypted: false,
  version: "3.1.0",
  projects: [
    {
      project: "a",
      hostname: "ha",
      username: "ua",
      sourceLocation: "~/code/a",
      destinationLocation: "/srv/a",
      excludes: [".git", "dist"],
      excludesFile: ".gitignore",
      websocketPort: 8080,
      followSymLinks: true
    },
    { project: "b", hostname: "hb", username: "ub", sourceLocation: b, destinationLocation: "~/b", websocketPort: "9000" },
    { project: "gone", hostname: "hg", sourceLocation: path.join(home, "gone"), destinationLocation: "/srv/gone" }
  ]
})

describe("sicksync migrate", () => {
  it("says when there is nothing to migrate", () => {
    const home = tmp()
    expect(sicksync(home, home, "migrate")).toEqual({
      status: 0,
      stdout: `Nothing to migrate: no ~/.sicksync/config.json and no 1.x ${registryOf(home)}.\n`,
      stderr: ""
    })
  })

  it("2.x/3.x: usable before migrating (with a warning), then migrated to project files and the registry", () => {
    const home = tmp()
    const a = mkdir(home, "code", "a")
    const b = mkdir(home, "code", "b")
    const legacyFile = writeFile(path.join(home, ".sicksync", "config.json"), legacyV2(home, b))
    const legacyText = fs.readFileSync(legacyFile, "utf8")
    const warning = `warning: using legacy config ${legacyFile}; run \`sicksync migrate\` to move to .sicksync-config.json files\n`

    const before = sicksync(home, mkdir(a, "src"), "info", "--json")
    expect(before.stderr).toBe(warning)
    expect(JSON.parse(before.stdout)).toMatchObject({ name: "a", alias: "a", root: a, configFile: legacyFile, followSymLinks: true })

    const r = sicksync(home, home, "migrate")
    expect(r.stdout).toBe(
      [
        `Migrated ${legacyFile} (2.x). Wrote:`,
        `  ${path.join(a, PROJECT_FILE)}`,
        `  ${path.join(b, PROJECT_FILE)}`,
        `  ${registryOf(home)} (2 projects)`,
        `Skipped: gone: ${path.join(home, "gone")} does not exist`,
        "The old files were left in place.",
        ""
      ].join("\n")
    )
    expect(r.stderr).toBe("")
    expect(r.status).toBe(0)
    expect(readJson(path.join(a, PROJECT_FILE))).toEqual({
      $schema: PROJECT_SCHEMA_URL,
      project: "a",
      destinations: [{ hostname: "ha", destinationLocation: "/srv/a", username: "ua" }],
      excludes: [".git", "dist"],
      excludesFile: ".gitignore",
      followSymLinks: true,
      websocketPort: 8080
    })
    expect(readJson(path.join(b, PROJECT_FILE))).toEqual({
      $schema: PROJECT_SCHEMA_URL,
      project: "b",
      destinations: [{ hostname: "hb", destinationLocation: "~/b", username: "ub" }],
      websocketPort: 9000
    })
    expect(readJson(registryOf(home))).toEqual({
      $schema: REGISTRY_SCHEMA_URL,
      projects: [
        { path: a, alias: "a", active: true },
        { path: b, alias: "b", active: true }
      ]
    })
    expect(fs.readFileSync(legacyFile, "utf8")).toBe(legacyText)

    // Afterwards: no warning; the migrated project resolves the same.
    const after = sicksync(home, mkdir(a, "src"), "info", "--json")
    expect(after.stderr).toBe("")
    expect({ ...JSON.parse(after.stdout), configFile: legacyFile }).toEqual(JSON.parse(before.stdout))

    // Running it again keeps what is there.
    const again = sicksync(home, home, "migrate")
    expect(again.stdout).toBe(
      [
        `Migrated ${legacyFile} (2.x). Wrote:`,
        `  ${registryOf(home)} (2 projects)`,
        `Skipped: ${path.join(a, PROJECT_FILE)}: already exists, kept as it is`,
        `Skipped: ${path.join(b, PROJECT_FILE)}: already exists, kept as it is`,
        `Skipped: gone: ${path.join(home, "gone")} does not exist`,
        "The old files were left in place.",
        ""
      ].join("\n")
    )
    expect((readJson(registryOf(home)) as { projects: Array<unknown> }).projects).toHaveLength(2)
  })

  it("1.x: keeps a copy of the flat file, then writes the project file and the registry in its place", () => {
    const home = tmp()
    const root = mkdir(home, "proj")
    const v1 = {
      hostname: "box",
      userName: "joe",
      sourceLocation: "~/proj",
      destinationLocation: "/home/joe/proj",
      excludes: [".git", "node_modules"],
      debug: true,
      websocketPort: "7000",
      followSymlinks: true
    }
    const file = writeFile(registryOf(home), v1)
    const original = fs.readFileSync(file, "utf8")
    const r = sicksync(home, home, "migrate")
    const backup = path.join(home, ".sicksync-config.v1.json")
    expect(r.stdout).toBe(
      [
        `Migrated ${file} (1.x). Wrote:`,
        `  ${backup} (copy of the 1.x config)`,
        `  ${path.join(root, PROJECT_FILE)}`,
        `  ${file} (1 project)`,
        "The old files were left in place.",
        ""
      ].join("\n")
    )
    expect(r.stderr).toBe("")
    expect(r.status).toBe(0)
    expect(fs.readFileSync(backup, "utf8")).toBe(original)
    expect(readJson(path.join(root, PROJECT_FILE))).toEqual({
      $schema: PROJECT_SCHEMA_URL,
      destinations: [{ hostname: "box", destinationLocation: "/home/joe/proj", username: "joe" }],
      excludes: [".git", "node_modules"],
      followSymLinks: true,
      websocketPort: 7000
    })
    expect(readJson(file)).toEqual({ $schema: REGISTRY_SCHEMA_URL, projects: [{ path: root, alias: "proj", active: true }] })
  })

  it("an invalid legacy project stops the migration before anything is written", () => {
    const home = tmp()
    const a = mkdir(home, "a")
    const legacyFile = writeFile(path.join(home, ".sicksync", "config.json"), {
      projects: [
        { project: "a", hostname: "h", sourceLocation: a, destinationLocation: "/srv/a" },
        { project: "b", hostname: "h", sourceLocation: a, destinationLocation: "relative" }
      ]
    })
    expectUserError(
      sicksync(home, home, "migrate"),
      `${legacyFile}: projects.1.destinationLocation: expected an absolute path or one starting with ~/, got "relative"`
    )
    expect(fs.readdirSync(a)).toEqual([])
    expect(fs.existsSync(registryOf(home))).toBe(false)
  })
})

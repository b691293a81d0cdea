/**
 * The configuration layer: pure helpers (JSON parsing, legacy normalisation, validation messages,
 * resolution of a project file) and the SyncConfig service on temporary directories and a temporary $HOME.
 */
import * as NodeContext from "@effect/platform-node/NodeContext"
import { describe, expect, it } from "@effect/vitest"
import { type Context, Effect, Either, Layer, Logger } from "effect"
import * as fs from "node:fs"
import * as path from "node:path"
import { DEFAULT_EXCLUDES, PROJECT_FILE, type ProjectFile, type ResolvedProject } from "../src/schemas/ConfigFile.js"
import * as Config from "../src/services/Config.js"
import {
  classifyConfigJson,
  decodeProjectJson,
  normaliseProjectJson,
  parseJsonText,
  resolveProjectFile,
  SyncConfig
} from "../src/services/Config.js"
import { mkdir, tempDirs, writeFile } from "./support/fixtures.js"

// ---- helpers ----------------------------------------------------------------------------------

const tmp = tempDirs("sicksync-config-")

const writeProject = (root: string, value: unknown): string => writeFile(path.join(root, PROJECT_FILE), value)

const oneDestination = (extra: Record<string, unknown> = {}) => ({
  destinations: [{ hostname: "box", destinationLocation: "/srv/app" }],
  ...extra
})

const text = (message: unknown): string =>
  Array.isArray(message) ? message.map(text).join(" ") : typeof message === "string" ? message : String(message)

type Service = Context.Tag.Service<SyncConfig>

/** Runs `f` against the live service with `home`; collects what it logs instead of printing it. */
const withHome = <A, E>(home: string, f: (config: Service) => Effect.Effect<A, E>) =>
  Effect.gen(function* () {
    const logs: Array<string> = []
    const logger = Logger.make(({ logLevel, message }) => {
      logs.push(`${logLevel.label}: ${text(message)}`)
    })
    const result = yield* Effect.flatMap(SyncConfig, f).pipe(
      Effect.either,
      Effect.provide(Config.layer({ home }).pipe(Layer.provide(NodeContext.layer))),
      Effect.provide(Logger.replace(Logger.defaultLogger, logger))
    )
    return { result, logs }
  })

const right = <A, E>(result: Either.Either<A, E>): A => {
  if (Either.isLeft(result)) throw new Error(`expected success, got ${String((result.left as { message?: string }).message ?? result.left)}`)
  return result.right
}

/** The failure's tag and message. */
const left = <A, E>(result: Either.Either<A, E>): { readonly tag: string; readonly message: string } => {
  if (Either.isRight(result)) throw new Error(`expected a failure, got ${JSON.stringify(result.right)}`)
  const error = result.left as { readonly _tag: string; readonly message: string }
  return { tag: error._tag, message: error.message }
}

const names = (projects: ReadonlyArray<ResolvedProject>) => projects.map((p) => p.name)

const resolveIn = (home: string, request: Partial<Config.ResolveRequest> & { readonly cwd: string }) =>
  withHome(home, (c) => c.resolve({ aliases: [], all: false, global: false, ...request }))

const FILE = "/work/proj/.sicksync-config.json"

const decodeIssues = (json: unknown): ReadonlyArray<string> => {
  const result = decodeProjectJson(FILE, json)
  if (Either.isRight(result)) throw new Error(`expected ${JSON.stringify(json)} to be refused`)
  return result.left.issues
}

const decoded = (json: unknown): ProjectFile => {
  const result = decodeProjectJson(FILE, json)
  if (Either.isLeft(result)) throw new Error(result.left.message)
  return result.right.config
}

const resolved = (json: unknown, options: Partial<Parameters<typeof resolveProjectFile>[0]> = {}): ResolvedProject => {
  const result = resolveProjectFile({ file: FILE, config: decoded(json), alias: undefined, defaults: undefined, ...options })
  if (Either.isLeft(result)) throw new Error(result.left.message)
  return result.right
}

// ---- parseJsonText ----------------------------------------------------------------------------

describe("parseJsonText", () => {
  const message = (textIn: string) => {
    const result = parseJsonText(FILE, textIn)
    if (Either.isRight(result)) throw new Error("expected a JSON error")
    return result.left.message
  }

  it("parses strict JSON", () => {
    expect(parseJsonText(FILE, `{"a": [1, "two", null, true]}`)).toEqual(Either.right({ a: [1, "two", null, true] }))
  })

  it("points at the line and column of a syntax error", () => {
    expect(message(`{\n  "destinations": [\n    {"hostname": "h",, }\n  ]\n}\n`)).toBe(
      `${FILE}: invalid JSON at line 3, column 22: expected a property name in double quotes`
    )
    expect(message(`{\n\t"a": tru\n}`)).toBe(`${FILE}: invalid JSON at line 2, column 7: unexpected character`)
    expect(message(`{"a": 1} x`)).toBe(`${FILE}: invalid JSON at line 1, column 10: unexpected character`)
    expect(message(`{`)).toBe(`${FILE}: invalid JSON at line 1, column 2: expected '}'`)
  })

  it("refuses trailing commas, comments and single quotes", () => {
    expect(message(`{\n  "a": 1,\n}`)).toBe(`${FILE}: invalid JSON at line 3, column 1: expected a property name in double quotes`)
    expect(message(`[1,]`)).toBe(`${FILE}: invalid JSON at line 1, column 4: expected a value`)
    expect(message(`// note\n{}`)).toBe(`${FILE}: invalid JSON at line 1, column 1: comments are not allowed in JSON`)
    expect(message(`{'a': 1}`)).toBe(`${FILE}: invalid JSON at line 1, column 2: unexpected character`)
  })

  it("says so when the file is empty", () => {
    expect(message("")).toBe(`${FILE}: invalid JSON: the file is empty`)
    expect(message("  \n\n")).toBe(`${FILE}: invalid JSON: the file is empty`)
  })
})

// ---- normaliseProjectJson / classifyConfigJson ------------------------------------------------

describe("normaliseProjectJson", () => {
  it("turns the legacy single-destination fields into one destination", () => {
    expect(
      normaliseProjectJson({
        project: "app",
        hostname: "box",
        destinationLocation: "/srv/app",
        userName: "joe",
        port: 2222,
        identityFile: "~/.ssh/k",
        transport: "ssh",
        websocketPort: 9000,
        followSymlinks: true,
        excludes: ["a"]
      })
    ).toEqual({
      value: {
        project: "app",
        destinations: [
          {
            hostname: "box",
            destinationLocation: "/srv/app",
            username: "joe",
            port: 2222,
            identityFile: "~/.ssh/k",
            transport: "ssh",
            websocketPort: 9000
          }
        ],
        websocketPort: 9000,
        followSymLinks: true,
        excludes: ["a"]
      },
      warnings: []
    })
  })

  it("prefers the current spellings when both are present", () => {
    expect(
      normaliseProjectJson({
        hostname: "box",
        destinationLocation: "/x",
        username: "new",
        userName: "old",
        followSymlinks: false,
        followSymLinks: true
      })
    ).toEqual({
      value: { destinations: [{ hostname: "box", destinationLocation: "/x", username: "new" }], followSymLinks: true },
      warnings: []
    })
    expect(normaliseProjectJson({ destinations: [{ hostname: "h", destinationLocation: "/x", userName: "joe" }] })).toEqual({
      value: { destinations: [{ hostname: "h", destinationLocation: "/x", username: "joe" }] },
      warnings: []
    })
  })

  it("warns about keys nobody reads, at the top level and in destinations", () => {
    const { value, warnings } = normaliseProjectJson({
      destinations: [{ hostname: "h", destinationLocation: "/x" }, { hostname: "i", destinationLocation: "/y", colour: "red" }],
      debug: true,
      hostname: "ignored-next-to-destinations"
    })
    expect(warnings).toEqual([
      "debug: unknown key, ignored",
      "hostname: unknown key, ignored",
      "destinations.1.colour: unknown key, ignored"
    ])
    expect(value).toEqual({
      destinations: [{ hostname: "h", destinationLocation: "/x" }, { hostname: "i", destinationLocation: "/y", colour: "red" }]
    })
  })

  it("leaves what is not an object to the validation", () => {
    expect(normaliseProjectJson([1])).toEqual({ value: [1], warnings: [] })
    expect(normaliseProjectJson(null)).toEqual({ value: null, warnings: [] })
  })
})

describe("classifyConfigJson", () => {
  it("tells project files, registries and 1.x configs apart by shape", () => {
    expect(classifyConfigJson(oneDestination())).toBe("project")
    expect(classifyConfigJson({ hostname: "h", destinationLocation: "/x" })).toBe("project")
    expect(classifyConfigJson({ projects: [] })).toBe("registry")
    expect(classifyConfigJson({ projects: [{ path: "/a" }], defaults: {} })).toBe("registry")
    expect(classifyConfigJson({ hostname: "h", sourceLocation: "~/a", destinationLocation: "/x" })).toBe("legacy-flat")
    expect(classifyConfigJson([])).toBe("project")
  })
})

// ---- decodeProjectJson: every validation path -------------------------------------------------

describe("decodeProjectJson", () => {
  const withDestination = (extra: Record<string, unknown>) => ({
    destinations: [{ hostname: "box", destinationLocation: "/srv/app", ...extra }]
  })

  it.each([
    ["port \"abc\"", withDestination({ port: "abc" }), `destinations.0.port: expected an integer between 1 and 65535, got "abc"`],
    ["port 0", withDestination({ port: 0 }), "destinations.0.port: expected an integer between 1 and 65535, got 0"],
    ["port 70000", withDestination({ port: 70000 }), "destinations.0.port: expected an integer between 1 and 65535, got 70000"],
    ["port 22.5", withDestination({ port: 22.5 }), "destinations.0.port: expected an integer between 1 and 65535, got 22.5"],
    [
      "project websocketPort -1",
      oneDestination({ websocketPort: -1 }),
      "websocketPort: expected an integer between 0 and 65535 (0 = any free port), got -1"
    ],
    [
      "destination websocketPort -1",
      withDestination({ websocketPort: -1 }),
      "destinations.0.websocketPort: expected an integer between 0 and 65535 (0 = any free port), got -1"
    ],
    [
      "relative destinationLocation",
      withDestination({ destinationLocation: "srv/app" }),
      `destinations.0.destinationLocation: expected an absolute path or one starting with ~/, got "srv/app"`
    ],
    [
      "~ alone",
      withDestination({ destinationLocation: "~" }),
      `destinations.0.destinationLocation: expected an absolute path or one starting with ~/, got "~"`
    ],
    [
      "~/ alone",
      withDestination({ destinationLocation: "~/" }),
      `destinations.0.destinationLocation: expected an absolute path or one starting with ~/, got "~/"`
    ],
    ["empty destinations", { destinations: [] }, "destinations: expected a non-empty list of destinations, got []"],
    [
      "destinations an object",
      { destinations: { hostname: "box", destinationLocation: "/x" } },
      `destinations: expected a list of destinations, got {"hostname":"box","destinationLocation":"/x"}`
    ],
    ["destinations a string", { destinations: "box" }, `destinations: expected a list of destinations, got "box"`],
    [
      "a destination that is not an object",
      { destinations: ["box"] },
      `destinations.0: expected an object with hostname and destinationLocation, got "box"`
    ],
    ["missing hostname", { destinations: [{ destinationLocation: "/x" }] }, "destinations.0.hostname: is required but missing"],
    ["missing destinationLocation", { destinations: [{ hostname: "box" }] }, "destinations.0.destinationLocation: is required but missing"],
    ["missing destinations", { project: "app" }, "destinations: is required but missing"],
    ["blank hostname", withDestination({ hostname: " " }), `destinations.0.hostname: expected a non-empty string, got " "`],
    ["transport \"ftp\"", withDestination({ transport: "ftp" }), `destinations.0.transport: expected "ssh" or "local", got "ftp"`],
    ["excludes not a list", oneDestination({ excludes: ".git" }), `excludes: expected a list of strings, got ".git"`],
    ["excludes with a number", oneDestination({ excludes: [".git", 3] }), "excludes.1: expected a string, got 3"],
    ["excludesFile a number", oneDestination({ excludesFile: 3 }), "excludesFile: expected a path or a list of paths, got 3"],
    ["followSymLinks \"yes\"", oneDestination({ followSymLinks: "yes" }), `followSymLinks: expected true or false, got "yes"`],
    ["followSymlinks 1 (legacy spelling)", oneDestination({ followSymlinks: 1 }), "followSymLinks: expected true or false, got 1"],
    ["empty project name", oneDestination({ project: "" }), `project: expected a non-empty string, got ""`],
    ["a list", [], "expected a JSON object, got []"],
    ["null", null, "expected a JSON object, got null"]
  ])("%s", (_, json, issue) => {
    expect(decodeIssues(json)).toEqual([issue])
  })

  it("reports every problem of a file at once", () => {
    expect(decodeIssues({ project: "", destinations: [{ hostname: 1, destinationLocation: "x", port: "22" }] })).toEqual([
      `project: expected a non-empty string, got ""`,
      "destinations.0.hostname: expected a non-empty string, got 1",
      `destinations.0.destinationLocation: expected an absolute path or one starting with ~/, got "x"`,
      `destinations.0.port: expected an integer between 1 and 65535, got "22"`
    ])
    const result = decodeProjectJson(FILE, { destinations: [{ hostname: "h", destinationLocation: "/x", port: "abc" }] })
    expect(Either.isLeft(result) && result.left.message).toBe(
      `${FILE}: destinations.0.port: expected an integer between 1 and 65535, got "abc"`
    )
  })

  it("accepts every documented field and returns the unknown-key warnings", () => {
    const json = {
      $schema: "file:///x/project.schema.json",
      project: "app",
      destinations: [
        {
          name: "prod",
          hostname: "box",
          destinationLocation: "~/app",
          username: "joe",
          port: 2222,
          identityFile: "~/.ssh/id",
          websocketPort: 0,
          transport: "local"
        }
      ],
      excludes: [],
      excludesFile: "ignore.txt",
      followSymLinks: true,
      websocketPort: 9000
    }
    expect(decodeProjectJson(FILE, { ...json, extra: 1 })).toEqual(Either.right({ config: json, warnings: ["extra: unknown key, ignored"] }))
  })

  it("accepts the legacy single-destination spelling", () => {
    expect(decoded({ hostname: "box", destinationLocation: "/srv", userName: "joe", followSymlinks: true })).toEqual({
      destinations: [{ hostname: "box", destinationLocation: "/srv", username: "joe" }],
      followSymLinks: true
    })
  })
})

// ---- resolveProjectFile -----------------------------------------------------------------------

describe("resolveProjectFile", () => {
  it("fills in the defaults", () => {
    expect(resolved(oneDestination(), { alias: "ap" })).toEqual({
      name: "proj",
      alias: "ap",
      root: "/work/proj",
      configFile: FILE,
      destinations: [
        {
          name: "box",
          hostname: "box",
          destinationLocation: "/srv/app",
          username: undefined,
          port: undefined,
          identityFile: undefined,
          websocketPort: 8675,
          transport: "ssh"
        }
      ],
      excludes: [".git", ".idea", "*.swp", ".svn"],
      excludesFile: ["/work/proj/.gitignore"],
      followSymLinks: false
    })
    expect(DEFAULT_EXCLUDES).toEqual([".git", ".idea", "*.swp", ".svn"])
  })

  it("resolves excludesFile against the project root, whatever the cwd", () => {
    expect(resolved(oneDestination({ excludesFile: "conf/ignore" })).excludesFile).toEqual(["/work/proj/conf/ignore"])
    expect(resolved(oneDestination({ excludesFile: [".gitignore", "../shared/ignore", "/etc/ignore"] })).excludesFile).toEqual([
      "/work/proj/.gitignore",
      "/work/shared/ignore",
      "/etc/ignore"
    ])
    expect(resolved(oneDestination({ excludesFile: [] })).excludesFile).toEqual([])
  })

  it("applies the registry's defaults to what a file leaves out, and nothing else", () => {
    const defaults = { username: "dflt", identityFile: "~/.ssh/dflt", websocketPort: 7000, excludes: ["node_modules"] }
    const json = {
      destinations: [
        { hostname: "a", destinationLocation: "/a" },
        { hostname: "b", destinationLocation: "/b", username: "own", identityFile: "~/.ssh/own", websocketPort: 7001 }
      ]
    }
    const p = resolved(json, { defaults })
    expect(p.excludes).toEqual(["node_modules"])
    expect(p.destinations.map((d) => [d.username, d.identityFile, d.websocketPort])).toEqual([
      ["dflt", "~/.ssh/dflt", 7000],
      ["own", "~/.ssh/own", 7001]
    ])
    // A project-level websocketPort and excludes beat the user's defaults.
    const q = resolved({ ...json, websocketPort: 9000, excludes: [] }, { defaults })
    expect(q.destinations.map((d) => d.websocketPort)).toEqual([9000, 7001])
    expect(q.excludes).toEqual([])
  })

  it("names destinations by hostname, and host:path when a host appears twice", () => {
    const p = resolved({
      destinations: [
        { hostname: "box", destinationLocation: "/a" },
        { hostname: "other", destinationLocation: "/a" },
        { hostname: "box", destinationLocation: "~/b" },
        { hostname: "named", destinationLocation: "/c", name: "prod" }
      ]
    })
    expect(p.destinations.map((d) => d.name)).toEqual(["box:/a", "other", "box:~/b", "prod"])
  })

  it("refuses two destinations with the same name", () => {
    const issuesOf = (json: unknown) => {
      const result = resolveProjectFile({ file: FILE, config: decoded(json), alias: undefined, defaults: undefined })
      if (Either.isRight(result)) throw new Error("expected duplicate names to be refused")
      return result.left.message
    }
    expect(
      issuesOf({
        destinations: [
          { hostname: "a", destinationLocation: "/a", name: "x" },
          { hostname: "b", destinationLocation: "/b", name: "x" }
        ]
      })
    ).toBe(`${FILE}: destinations.1: same name "x" as destinations.0; give one a "name"`)
    expect(
      issuesOf({
        destinations: [
          { hostname: "a", destinationLocation: "/a" },
          { hostname: "a", destinationLocation: "/a" }
        ]
      })
    ).toBe(`${FILE}: destinations.1: same name "a:/a" as destinations.0; give one a "name"`)
  })
})

// ---- the service: reading files ----------------------------------------------------------------

describe("SyncConfig files", () => {
  it.effect("readProjectFile logs unknown keys as warnings naming the file", () =>
    Effect.gen(function* () {
      const home = tmp()
      const file = writeProject(mkdir(home, "p"), { ...oneDestination(), debug: true })
      const { result, logs } = yield* withHome(home, (c) => c.readProjectFile(file))
      expect(right(result)).toEqual(oneDestination())
      expect(logs).toEqual([`WARN: ${file}: debug: unknown key, ignored`])
    }))

  it.effect("readProjectFile: a missing file, invalid JSON and an empty file are config errors", () =>
    Effect.gen(function* () {
      const home = tmp()
      const missing = path.join(home, "nope", PROJECT_FILE)
      expect(left((yield* withHome(home, (c) => c.readProjectFile(missing))).result)).toEqual({
        tag: "ConfigError",
        message: `${missing}: no such file`
      })
      const broken = writeProject(mkdir(home, "broken"), `{\n  "destinations": [\n    { "hostname": "h" }\n  ,\n}`)
      expect(left((yield* withHome(home, (c) => c.readProjectFile(broken))).result).message).toBe(
        `${broken}: invalid JSON at line 5, column 1: expected a value`
      )
      const empty = writeProject(mkdir(home, "empty"), "")
      expect(left((yield* withHome(home, (c) => c.readProjectFile(empty))).result).message).toBe(
        `${empty}: invalid JSON: the file is empty`
      )
    }))

  it.effect("findProjectFile walks up from nested directories, past registry-shaped and 1.x files", () =>
    Effect.gen(function* () {
      const home = tmp()
      const root = mkdir(home, "work", "app")
      const file = writeProject(root, oneDestination())
      writeFile(path.join(root, "a", PROJECT_FILE), { projects: [] })
      writeFile(path.join(root, "a", "b", PROJECT_FILE), { hostname: "h", sourceLocation: "/x", destinationLocation: "/y" })
      const deep = mkdir(root, "a", "b", "c", "d")
      expect(right((yield* withHome(home, (c) => c.findProjectFile(deep))).result)).toBe(file)
      expect(right((yield* withHome(home, (c) => c.findProjectFile(root))).result)).toBe(file)
      // Nothing above a fresh temporary directory.
      expect(right((yield* withHome(home, (c) => c.findProjectFile(mkdir(home, "elsewhere")))).result)).toBeUndefined()
    }))

  it.effect("writeJson writes indented JSON with a final newline, creating directories, leaving no temp file", () =>
    Effect.gen(function* () {
      const home = tmp()
      const file = path.join(home, "x", "y", "out.json")
      right((yield* withHome(home, (c) => c.writeJson(file, { a: [1, 2], b: "c" }))).result)
      expect(fs.readFileSync(file, "utf8")).toBe(`{\n  "a": [\n    1,\n    2\n  ],\n  "b": "c"\n}\n`)
      expect(fs.readdirSync(path.dirname(file))).toEqual(["out.json"])
    }))
})

// ---- the service: the registry ----------------------------------------------------------------

describe("SyncConfig registry", () => {
  it.effect("no registry file, or a 1.x file in its place, is no registry", () =>
    Effect.gen(function* () {
      const home = tmp()
      const registryFile = path.join(home, PROJECT_FILE)
      expect(right((yield* withHome(home, (c) => c.readRegistry)).result)).toEqual({ file: registryFile, registry: undefined })
      writeFile(registryFile, { hostname: "h", sourceLocation: "~/a", destinationLocation: "/a" })
      expect(right((yield* withHome(home, (c) => c.readRegistry)).result)).toEqual({ file: registryFile, registry: undefined })
    }))

  it.effect("a duplicate alias is a config error naming both entries", () =>
    Effect.gen(function* () {
      const home = tmp()
      const registryFile = writeFile(path.join(home, PROJECT_FILE), {
        projects: [
          { path: "/a", alias: "web" },
          { path: "/b", alias: "api" },
          { path: "/c", alias: "web" }
        ]
      })
      expect(left((yield* withHome(home, (c) => c.readRegistry)).result)).toEqual({
        tag: "ConfigError",
        message: `${registryFile}: projects.2.alias: "web" is already the alias of projects.0`
      })
      // ...and it stops resolution before anything else.
      expect(left((yield* resolveIn(home, { cwd: home, all: true })).result).tag).toBe("ConfigError")
    }))

  it.effect("invalid entries name their JSON path", () =>
    Effect.gen(function* () {
      const home = tmp()
      const registryFile = writeFile(path.join(home, PROJECT_FILE), {
        projects: [{ path: "relative/dir", alias: "-x", active: "yes" }],
        defaults: { websocketPort: 70000 }
      })
      expect(left((yield* withHome(home, (c) => c.readRegistry)).result).message).toBe(
        [
          `${registryFile}: projects.0.path: expected an absolute path, got "relative/dir"`,
          `${registryFile}: projects.0.alias: expected an alias of letters, digits, '.', '_' or '-' (not starting with '-'), got "-x"`,
          `${registryFile}: projects.0.active: expected true or false, got "yes"`,
          `${registryFile}: defaults.websocketPort: expected an integer between 0 and 65535 (0 = any free port), got 70000`
        ].join("\n")
      )
      writeFile(registryFile, { projects: {} })
      expect(left((yield* withHome(home, (c) => c.readRegistry)).result).message).toBe(
        `${registryFile}: projects: expected a list of projects, got {}`
      )
    }))

  it.effect("unknown registry keys are warnings, each said once", () =>
    Effect.gen(function* () {
      const home = tmp()
      const registryFile = writeFile(path.join(home, PROJECT_FILE), {
        projects: [{ path: "/a", alias: "a", colour: "red" }],
        defaults: { username: "u", shell: "zsh" },
        version: 3
      })
      const { result, logs } = yield* withHome(home, (c) => Effect.zipRight(c.readRegistry, c.readRegistry))
      expect(right(result).registry).toEqual({ projects: [{ path: "/a", alias: "a" }], defaults: { username: "u" } })
      expect(logs).toEqual([
        `WARN: ${registryFile}: version: unknown key, ignored`,
        `WARN: ${registryFile}: projects.0.colour: unknown key, ignored`,
        `WARN: ${registryFile}: defaults.shell: unknown key, ignored`
      ])
    }))

  it.effect("writeRegistry then readRegistry round-trips", () =>
    Effect.gen(function* () {
      const home = tmp()
      const registry = { projects: [{ path: "/a", alias: "a", active: false }], defaults: { excludes: ["x"] } }
      const { result } = yield* withHome(home, (c) => Effect.zipRight(c.writeRegistry(registry), c.readRegistry))
      expect(right(result)).toEqual({ file: path.join(home, PROJECT_FILE), registry })
    }))
})

// ---- the service: resolution ------------------------------------------------------------------

/** $HOME with a registry of three projects: web (active), api (inactive), tools (no alias). */
const registeredHome = () => {
  const home = tmp()
  const web = mkdir(home, "code", "web")
  const api = mkdir(home, "code", "api")
  const tools = mkdir(home, "code", "tools")
  writeProject(web, { project: "web", destinations: [{ hostname: "w", destinationLocation: "/srv/web" }] })
  writeProject(api, { project: "api", destinations: [{ hostname: "a", destinationLocation: "/srv/api" }] })
  writeProject(tools, { project: "tools", destinations: [{ hostname: "t", destinationLocation: "/srv/tools" }] })
  const registryFile = writeFile(path.join(home, PROJECT_FILE), {
    projects: [
      { path: web, alias: "web", active: true },
      { path: api, alias: "api", active: false },
      { path: tools }
    ]
  })
  const listing = [
    `Registered projects (${registryFile}):`,
    `  ${"web".padEnd(16)} ${web}`,
    `  ${"api".padEnd(16)} ${api}  (inactive)`,
    `  ${"(no alias)".padEnd(16)} ${tools}`
  ].join("\n")
  return { home, web, api, tools, registryFile, listing }
}

describe("SyncConfig.resolve", () => {
  it.effect("from a nested subdirectory: the closest project file, with its alias from the registry", () =>
    Effect.gen(function* () {
      const { home, web } = registeredHome()
      const deep = mkdir(web, "src", "components", "button")
      const [project, ...rest] = right((yield* resolveIn(home, { cwd: deep })).result)
      expect(rest).toEqual([])
      expect(project).toMatchObject({ name: "web", alias: "web", root: web, configFile: path.join(web, PROJECT_FILE) })
      // An unregistered project: no alias.
      const loose = mkdir(home, "loose")
      writeProject(loose, oneDestination())
      const [looseProject] = right((yield* resolveIn(home, { cwd: mkdir(loose, "x") })).result)
      expect(looseProject).toMatchObject({ name: "loose", alias: undefined, root: loose })
    }))

  it.effect("a project file in $HOME itself is recognised by its shape", () =>
    Effect.gen(function* () {
      const home = tmp()
      writeProject(home, { destinations: [{ hostname: "box", destinationLocation: "~/home-mirror" }] })
      for (const cwd of [home, mkdir(home, "a", "b")]) {
        const { result, logs } = yield* resolveIn(home, { cwd })
        expect(right(result).map((p) => [p.name, p.root, p.configFile])).toEqual([
          [path.basename(home), home, path.join(home, PROJECT_FILE)]
        ])
        expect(logs).toEqual([])
      }
    }))

  it.effect("the registry in $HOME is skipped while walking up from a project under $HOME", () =>
    Effect.gen(function* () {
      const { home, listing } = registeredHome()
      const loose = mkdir(home, "loose", "deeper")
      writeProject(path.dirname(loose), oneDestination({ project: "loose" }))
      expect(names(right((yield* resolveIn(home, { cwd: loose })).result))).toEqual(["loose"])
      // With no project file between cwd and $HOME, the registry is not taken for one.
      const elsewhere = mkdir(home, "elsewhere")
      expect(left((yield* resolveIn(home, { cwd: elsewhere })).result)).toEqual({
        tag: "ProjectNotFound",
        message: [
          `No ${PROJECT_FILE} in ${elsewhere} or its parents, and no registered project contains it.`,
          listing,
          "Pick one with `sicksync <alias>`, sync them all with `sicksync --all`, or create a project here with `sicksync init`."
        ].join("\n")
      })
    }))

  it.effect("$HOME with a trailing slash", () =>
    Effect.gen(function* () {
      const { home, web } = registeredHome()
      const { result } = yield* withHome(`${home}/`, (c) =>
        Effect.all([
          Effect.succeed(c.home),
          Effect.succeed(c.registryFile),
          c.resolve({ aliases: ["web"], all: false, global: false, cwd: home }),
          c.resolve({ aliases: [], all: false, global: true, cwd: path.join(web, "src") })
        ])
      )
      const [h, registryFile, byAlias, byCwd] = right(result)
      expect([h, registryFile]).toEqual([home, path.join(home, PROJECT_FILE)])
      expect(byAlias.map((p) => p.root)).toEqual([web])
      expect(byCwd.map((p) => p.root)).toEqual([web])

      const own = tmp()
      writeProject(own, oneDestination({ project: "home-project" }))
      const inHome = yield* withHome(`${own}/`, (c) => c.resolve({ aliases: [], all: false, global: false, cwd: `${own}/sub/..` }))
      expect(names(right(inHome.result))).toEqual(["home-project"])
    }))

  it.effect("aliases pick registry entries, in the order given, inactive ones included", () =>
    Effect.gen(function* () {
      const { home, listing } = registeredHome()
      const elsewhere = mkdir(home, "elsewhere")
      expect(names(right((yield* resolveIn(home, { cwd: elsewhere, aliases: ["api", "web"] })).result))).toEqual(["api", "web"])
      expect(left((yield* resolveIn(home, { cwd: elsewhere, aliases: ["web", "nope"] })).result)).toEqual({
        tag: "ProjectNotFound",
        message: `No project with alias "nope".\n${listing}`
      })
    }))

  it.effect("-g: the registered project containing the cwd, not the closest project file", () =>
    Effect.gen(function* () {
      const { home, web, listing } = registeredHome()
      const inner = mkdir(web, "packages", "inner")
      writeProject(inner, oneDestination({ project: "inner" }))
      const cwd = mkdir(inner, "src")
      expect(names(right((yield* resolveIn(home, { cwd })).result))).toEqual(["inner"])
      expect(names(right((yield* resolveIn(home, { cwd, global: true })).result))).toEqual(["web"])
      const outside = mkdir(home, "outside")
      expect(left((yield* resolveIn(home, { cwd: outside, global: true })).result)).toEqual({
        tag: "ProjectNotFound",
        message: [
          `No registered project contains ${outside}.`,
          listing,
          "Pick one with `sicksync <alias>`, sync them all with `sicksync --all`, or create a project here with `sicksync init`."
        ].join("\n")
      })
    }))

  it.effect("-g: the innermost of nested registered projects; a sibling with a common prefix is not inside", () =>
    Effect.gen(function* () {
      const home = tmp()
      const outer = mkdir(home, "outer")
      const inner = mkdir(outer, "inner")
      const sibling = mkdir(home, "outer-two")
      for (const [dir, name] of [[outer, "outer"], [inner, "inner"], [sibling, "sibling"]] as const) {
        writeProject(dir, oneDestination({ project: name }))
      }
      writeFile(path.join(home, PROJECT_FILE), { projects: [{ path: outer }, { path: inner }, { path: sibling }] })
      expect(names(right((yield* resolveIn(home, { cwd: mkdir(inner, "x"), global: true })).result))).toEqual(["inner"])
      expect(names(right((yield* resolveIn(home, { cwd: mkdir(outer, "y"), global: true })).result))).toEqual(["outer"])
      expect(names(right((yield* resolveIn(home, { cwd: sibling, global: true })).result))).toEqual(["sibling"])
    }))

  it.effect("--all: every active project; inactive ones are skipped", () =>
    Effect.gen(function* () {
      const { home } = registeredHome()
      expect(names(right((yield* resolveIn(home, { cwd: home, all: true })).result))).toEqual(["web", "tools"])

      const none = tmp()
      const registryFile = writeFile(path.join(none, PROJECT_FILE), { projects: [{ path: "/gone", alias: "gone", active: false }] })
      expect(left((yield* resolveIn(none, { cwd: none, all: true })).result)).toEqual({
        tag: "ProjectNotFound",
        message: [
          "No active projects to sync.",
          `Registered projects (${registryFile}):`,
          `  ${"gone".padEnd(16)} /gone  (inactive)`,
          "Register one with `sicksync add <path>` or `sicksync init`."
        ].join("\n")
      })
    }))

  it.effect("--all reports every broken project, not only the first", () =>
    Effect.gen(function* () {
      const { home, web, tools } = registeredHome()
      writeProject(web, { destinations: [{ hostname: "w", destinationLocation: "/srv/web", port: "abc" }] })
      writeProject(tools, "{")
      expect(left((yield* resolveIn(home, { cwd: home, all: true })).result)).toEqual({
        tag: "ConfigError",
        message: [
          `${path.join(web, PROJECT_FILE)}: destinations.0.port: expected an integer between 1 and 65535, got "abc"`,
          `${path.join(tools, PROJECT_FILE)}: invalid JSON at line 1, column 2: expected '}'`
        ].join("\n")
      })
    }))

  it.effect("the registry's defaults apply to registered and unregistered project files", () =>
    Effect.gen(function* () {
      const home = tmp()
      const root = mkdir(home, "p")
      writeProject(root, oneDestination())
      writeFile(path.join(home, PROJECT_FILE), {
        projects: [{ path: root, alias: "p" }],
        defaults: { username: "dflt", identityFile: "~/.ssh/dflt", websocketPort: 7000, excludes: ["node_modules"] }
      })
      const [p] = right((yield* resolveIn(home, { cwd: root })).result)
      expect(p!.excludes).toEqual(["node_modules"])
      expect(p!.destinations[0]).toMatchObject({ username: "dflt", identityFile: "~/.ssh/dflt", websocketPort: 7000 })
      const [byAlias] = right((yield* resolveIn(home, { cwd: home, aliases: ["p"] })).result)
      expect(byAlias).toEqual(p)
    }))

  it.effect("a broken project file stops resolution with file, JSON path, expected and found", () =>
    Effect.gen(function* () {
      const home = tmp()
      const root = mkdir(home, "p")
      const file = writeProject(root, { destinations: [{ hostname: "h", destinationLocation: "/x", port: "abc" }], colour: 1 })
      const { result, logs } = yield* resolveIn(home, { cwd: root })
      expect(left(result)).toEqual({
        tag: "ConfigError",
        message: `${file}: destinations.0.port: expected an integer between 1 and 65535, got "abc"`
      })
      expect(logs).toEqual([])
    }))

  it.effect("no project anywhere and no registry: says how to make one", () =>
    Effect.gen(function* () {
      const home = tmp()
      const cwd = mkdir(home, "x")
      expect(left((yield* resolveIn(home, { cwd })).result).message).toBe(
        [
          `No ${PROJECT_FILE} in ${cwd} or its parents, and no registered project contains it.`,
          `No projects are registered in ${path.join(home, PROJECT_FILE)}.`,
          "Pick one with `sicksync <alias>`, sync them all with `sicksync --all`, or create a project here with `sicksync init`."
        ].join("\n")
      )
    }))
})

// ---- legacy configurations --------------------------------------------------------------------

/** A 2.x/3.x `~/.sicksync/config.json` with two projects. */
const legacyV2Home = () => {
  const home = tmp()
  const a = mkdir(home, "code", "a")
  const b = mkdir(home, "code", "b")
  const legacyFile = writeFile(path.join(home, ".sicksync", "config.json"), {
    debug: true,
    retryOnDisconnect: true,
    prefersEncrypted: false,
    version: "3.0.0",
    projects: [
      {
        project: "a",
        hostname: "ha",
        username: "ua",
        sourceLocation: "~/code/a",
        destinationLocation: "/srv/a",
        excludes: [".git", "dist"],
        excludesFile: "ignore.txt",
        websocketPort: 8080,
        followSymLinks: true
      },
      { project: "b", hostname: "hb", username: "ub", sourceLocation: b, destinationLocation: "~/b", websocketPort: "9000" }
    ]
  })
  return { home, a, b, legacyFile }
}

describe("legacy configurations", () => {
  it.effect("2.x/3.x ~/.sicksync/config.json: read, usable by cwd, alias and --all, with a warning", () =>
    Effect.gen(function* () {
      const { home, a, b, legacyFile } = legacyV2Home()
      const sources = right((yield* withHome(home, (c) => c.readLegacy)).result)
      expect(sources).toEqual([
        {
          file: legacyFile,
          format: "2.x",
          projects: [
            {
              project: "a",
              hostname: "ha",
              username: "ua",
              sourceLocation: "~/code/a",
              destinationLocation: "/srv/a",
              excludes: [".git", "dist"],
              excludesFile: "ignore.txt",
              websocketPort: 8080,
              followSymLinks: true
            },
            { project: "b", hostname: "hb", username: "ub", sourceLocation: b, destinationLocation: "~/b", websocketPort: 9000 }
          ]
        }
      ])

      const { result, logs } = yield* resolveIn(home, { cwd: mkdir(a, "src") })
      expect(right(result)).toEqual([
        {
          name: "a",
          alias: "a",
          root: a,
          configFile: legacyFile,
          destinations: [
            {
              name: "ha",
              hostname: "ha",
              destinationLocation: "/srv/a",
              username: "ua",
              port: undefined,
              identityFile: undefined,
              websocketPort: 8080,
              transport: "ssh"
            }
          ],
          excludes: [".git", "dist"],
          excludesFile: [path.join(a, "ignore.txt")],
          followSymLinks: true
        }
      ])
      expect(logs).toEqual([
        `WARN: using legacy config ${legacyFile}; run \`sicksync migrate\` to move to .sicksync-config.json files`
      ])

      const [byAlias] = right((yield* resolveIn(home, { cwd: home, aliases: ["b"] })).result)
      expect(byAlias).toMatchObject({ name: "b", root: b, excludes: DEFAULT_EXCLUDES, excludesFile: [path.join(b, ".gitignore")] })
      expect(byAlias!.destinations[0]).toMatchObject({ username: "ub", destinationLocation: "~/b", websocketPort: 9000 })
      expect(names(right((yield* resolveIn(home, { cwd: home, all: true })).result))).toEqual(["a", "b"])
      expect(left((yield* resolveIn(home, { cwd: home, aliases: ["c"] })).result).message).toBe(
        [
          `No project with alias "c".`,
          `Projects in legacy config ${legacyFile}:`,
          `  ${"a".padEnd(16)} ~/code/a`,
          `  ${"b".padEnd(16)} ${b}`,
          "Run `sicksync migrate` to move them to the 2.0 format."
        ].join("\n")
      )
    }))

  it.effect("1.x flat ~/.sicksync-config.json: userName, followSymlinks, ignored keys", () =>
    Effect.gen(function* () {
      const home = tmp()
      const root = mkdir(home, "proj")
      const file = writeFile(path.join(home, PROJECT_FILE), {
        hostname: "box",
        userName: "joe",
        sourceLocation: "~/proj",
        destinationLocation: "/home/joe/proj",
        excludes: [".git", "node_modules"],
        debug: true,
        websocketPort: "7000",
        followSymlinks: true
      })
      const sources = right((yield* withHome(home, (c) => c.readLegacy)).result)
      expect(sources.map((s) => [s.file, s.format, s.projects.length])).toEqual([[file, "1.x", 1]])
      const { result, logs } = yield* resolveIn(home, { cwd: mkdir(root, "lib") })
      expect(right(result)).toEqual([
        {
          name: "proj",
          alias: undefined,
          root,
          configFile: file,
          destinations: [
            {
              name: "box",
              hostname: "box",
              destinationLocation: "/home/joe/proj",
              username: "joe",
              port: undefined,
              identityFile: undefined,
              websocketPort: 7000,
              transport: "ssh"
            }
          ],
          excludes: [".git", "node_modules"],
          excludesFile: [path.join(root, ".gitignore")],
          followSymLinks: true
        }
      ])
      expect(logs).toEqual([`WARN: using legacy config ${file}; run \`sicksync migrate\` to move to .sicksync-config.json files`])
      // -g finds it too; and the 1.x file is never taken for a project file.
      expect(names(right((yield* resolveIn(home, { cwd: root, global: true })).result))).toEqual(["proj"])
      expect(right((yield* withHome(home, (c) => c.findProjectFile(root))).result)).toBeUndefined()
    }))

  it.effect("a broken legacy file names the legacy file and its own JSON path", () =>
    Effect.gen(function* () {
      const home = tmp()
      const legacyFile = writeFile(path.join(home, ".sicksync", "config.json"), {
        projects: [
          { project: "a", hostname: "h", sourceLocation: "/a", destinationLocation: "/x" },
          { project: "b", hostname: "h", sourceLocation: "/b", destinationLocation: "relative" }
        ]
      })
      expect(left((yield* resolveIn(home, { cwd: home, all: true })).result)).toEqual({
        tag: "ConfigError",
        message: `${legacyFile}: projects.1.destinationLocation: expected an absolute path or one starting with ~/, got "relative"`
      })
      writeFile(legacyFile, { projects: [{ project: "a", hostname: "h", destinationLocation: "/x" }] })
      expect(left((yield* withHome(home, (c) => c.readLegacy)).result).message).toBe(
        `${legacyFile}: projects.0.sourceLocation: is required but missing`
      )
    }))

  it.effect("once a registry exists, the legacy file is no longer consulted", () =>
    Effect.gen(function* () {
      const { home, a } = legacyV2Home()
      writeFile(path.join(home, PROJECT_FILE), { projects: [] })
      const { result, logs } = yield* resolveIn(home, { cwd: a })
      expect(left(result).tag).toBe("ProjectNotFound")
      expect(logs).toEqual([])
    }))
})

/** Temp directories, files and resolved configs that many suites build. */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { afterAll } from "vitest"
import type { ResolvedDestination, ResolvedProject } from "../../src/schemas/ConfigFile.js"

/**
 * A maker of fresh directories (real paths, so comparisons with resolved paths hold), all removed
 * after the suite. Call it at the top level of a test file.
 */
export const tempDirs = (prefix: string): (() => string) => {
  const dirs: Array<string> = []
  afterAll(() => {
    for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true })
  })
  return () => {
    const dir = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), prefix)))
    dirs.push(dir)
    return dir
  }
}

export const mkdir = (...parts: Array<string>): string => {
  const dir = path.join(...parts)
  fs.mkdirSync(dir, { recursive: true })
  return dir
}

/** Writes a string as is, anything else as pretty JSON; creates the parent directories. */
export const writeFile = (file: string, value: unknown): string => {
  fs.mkdirSync(path.dirname(file), { recursive: true })
  fs.writeFileSync(file, typeof value === "string" ? value : `${JSON.stringify(value, null, 2)}\n`)
  return file
}

/** A resolved local destination named `name`. */
export const testDestination = (name: string): ResolvedDestination => ({
  name,
  hostname: name,
  destinationLocation: `/tmp/${name}`,
  username: undefined,
  port: undefined,
  identityFile: undefined,
  websocketPort: 0,
  transport: "local"
})

/** A resolved project "p" at `root` with no excludes. */
export const testProject = (
  root: string,
  options: { readonly destinations?: ReadonlyArray<string>; readonly followSymLinks?: boolean } = {}
): ResolvedProject => ({
  name: "p",
  alias: undefined,
  root,
  configFile: path.join(root, ".sicksync-config.json"),
  destinations: (options.destinations ?? []).map(testDestination),
  excludes: [],
  excludesFile: [],
  followSymLinks: options.followSymLinks ?? false
})

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
    // Retries ride over a process still changing things there on its way out (a daemon's state files).
    for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 })
  })
  return () => {
    const dir = fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), prefix)))
    dirs.push(dir)
    return dir
  }
}

/**
 * Stops the daemon named by `<home>/.sicksync/daemon.json`, if any, and waits (up to 5 s) until it has
 * exited: on its way out it still removes its state file and lock in `<home>`, so its home is not removed before.
 */
export const stopDaemonOf = async (home: string): Promise<void> => {
  let pid: number
  try {
    pid = (JSON.parse(fs.readFileSync(path.join(home, ".sicksync", "daemon.json"), "utf8")) as { pid: number }).pid
    process.kill(pid, "SIGTERM")
  } catch {
    return // no daemon, or already gone
  }
  const deadline = Date.now() + 5_000
  while (Date.now() < deadline) {
    try {
      process.kill(pid, 0)
    } catch {
      return
    }
    await new Promise((resolve) => setTimeout(resolve, 20))
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

/**
 * Runs the real CLI bundle (dist/sicksync.mjs) as a child process, as a user would.
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as path from "node:path"
import { fileURLToPath } from "node:url"

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..")
export const bundle = path.join(repoRoot, "dist", "sicksync.mjs")

/** Builds the bundle (and the editor schemas) unless they are newer than every file they come from. */
export const ensureBundle = () => {
  const newest = (dir: string): number =>
    fs.readdirSync(dir, { withFileTypes: true }).reduce((m, e) => {
      const p = path.join(dir, e.name)
      return Math.max(m, e.isDirectory() ? newest(p) : fs.statSync(p).mtimeMs)
    }, 0)
  const sources = Math.max(
    newest(path.join(repoRoot, "src")),
    ...["scripts/build.mjs", "scripts/gen-schema.ts", "package.json"].map((f) => fs.statSync(path.join(repoRoot, f)).mtimeMs)
  )
  const schemas = ["project", "registry"].every((n) => fs.existsSync(path.join(repoRoot, "schema", `${n}.schema.json`)))
  if (schemas && fs.existsSync(bundle) && fs.statSync(bundle).mtimeMs >= sources) return
  const r = spawnSync(process.execPath, [path.join(repoRoot, "scripts", "build.mjs")], { stdio: "inherit" })
  if (r.status !== 0) throw new Error("build failed")
}

/** Polls `check` until it holds; fails naming `what` after `timeoutMs`. */
export const waitUntil = async (what: string, check: () => boolean, timeoutMs = 30_000) => {
  const deadline = Date.now() + timeoutMs
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

export interface RunResult {
  readonly code: number | null
  readonly stdout: string
  readonly stderr: string
}

export const run = (args: ReadonlyArray<string>, options: { cwd: string; home: string; env?: Record<string, string> }): RunResult => {
  const r = spawnSync(process.execPath, [bundle, ...args], {
    cwd: options.cwd,
    env: { ...process.env, HOME: options.home, ...options.env },
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    timeout: 60_000
  })
  return { code: r.status, stdout: r.stdout, stderr: r.stderr }
}

/** A long-running `sicksync` whose output can be awaited line by line. */
export class Running {
  readonly lines: Array<string> = []
  private waiters: Array<() => void> = []
  readonly exited: Promise<number | null>

  constructor(readonly child: ChildProcess) {
    const onData = (chunk: Buffer) => {
      for (const line of chunk.toString("utf8").split("\n")) if (line !== "") this.lines.push(line)
      for (const w of this.waiters) w()
    }
    child.stdout?.on("data", onData)
    child.stderr?.on("data", onData)
    this.exited = new Promise((resolve) => child.once("exit", (code) => resolve(code)))
  }

  async waitFor(pattern: RegExp, timeoutMs = 15_000): Promise<string> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const hit = this.lines.find((l) => pattern.test(l))
      if (hit !== undefined) return hit
      if (Date.now() > deadline) throw new Error(`no line matching ${pattern} within ${timeoutMs} ms; output:\n${this.lines.join("\n")}`)
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 50)
        this.waiters.push(() => {
          clearTimeout(t)
          resolve()
        })
      })
      this.waiters = []
    }
  }

  /** SIGINT, then the exit code (SIGKILL after a timeout, failing the caller). */
  async stop(signal: NodeJS.Signals = "SIGINT", timeoutMs = 10_000): Promise<number | null> {
    if (this.child.exitCode !== null) return this.child.exitCode
    this.child.kill(signal)
    const timer = setTimeout(() => this.child.kill("SIGKILL"), timeoutMs)
    const code = await this.exited
    clearTimeout(timer)
    return code
  }
}

export const start = (args: ReadonlyArray<string>, options: { cwd: string; home: string; env?: Record<string, string> }) =>
  new Running(
    spawn(process.execPath, [bundle, ...args], {
      cwd: options.cwd,
      env: { ...process.env, HOME: options.home, ...options.env },
      stdio: ["ignore", "pipe", "pipe"]
    })
  )

#!/usr/bin/env node
/**
 * The README's main command (`npm run demo`): a sample project mirrored to a `local` destination
 * under a temp dir. It starts the real CLI, makes a few edits, shows the destination converging
 * after each, then stops sicksync and cleans up.
 */
import { spawn } from "node:child_process"
import { createHash } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { fileURLToPath } from "node:url"

const bundle = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "dist", "sicksync.mjs")
const base = fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-demo-"))
const home = path.join(base, "home")
const project = path.join(base, "webapp")
const remote = path.join(base, "devbox", "webapp")
fs.mkdirSync(home)
fs.mkdirSync(remote, { recursive: true })

const put = (rel, data) => {
  fs.mkdirSync(path.dirname(path.join(project, rel)), { recursive: true })
  fs.writeFileSync(path.join(project, rel), data)
}
put("src/app.ts", 'export const greet = (name: string) => `hello ${name}`\n')
put("README.md", "# webapp\n")
put(".gitignore", "dist/\n*.log\n")
put("dist/bundle.js", "// build output: excluded by .gitignore\n")
put(
  ".sicksync-config.json",
  JSON.stringify(
    {
      project: "webapp",
      destinations: [{ name: "devbox", hostname: "localhost", destinationLocation: remote, transport: "local", websocketPort: 0 }]
    },
    null,
    2
  )
)

/** path → "type size sha256" for every entry, excluded paths left out as sicksync leaves them. */
const listing = (root) => {
  const out = new Map()
  const walk = (dir) => {
    for (const name of fs.readdirSync(dir).sort()) {
      const abs = path.join(dir, name)
      const rel = path.relative(root, abs)
      if (rel === "dist" || rel.endsWith(".log")) continue
      const st = fs.lstatSync(abs)
      if (st.isDirectory()) {
        out.set(rel, "dir")
        walk(abs)
      } else out.set(rel, `${st.size} B ${createHash("sha256").update(fs.readFileSync(abs)).digest("hex").slice(0, 12)}`)
    }
  }
  walk(root)
  return out
}
const same = () => JSON.stringify([...listing(project)]) === JSON.stringify([...listing(remote)])

const converge = async (what) => {
  const t0 = Date.now()
  while (!same()) {
    if (Date.now() - t0 > 10_000) throw new Error(`the destination did not converge after: ${what}`)
    await new Promise((r) => setTimeout(r, 5))
  }
  console.log(`\n✓ ${what} — destination identical after ${Date.now() - t0} ms:`)
  for (const [rel, desc] of listing(remote)) console.log(`    ${rel.padEnd(28)} ${desc}`)
}

console.log(`demo project:     ${project}\n"remote" devbox:  ${remote}\n`)
const sicksync = spawn(process.execPath, [bundle], { cwd: project, env: { ...process.env, HOME: home }, stdio: ["ignore", "pipe", "pipe"] })
let partial = ""
const show = (chunk) => {
  const lines = (partial + chunk.toString()).split("\n")
  partial = lines.pop()
  for (const line of lines) console.log(`  sicksync │ ${line}`)
}
sicksync.stdout.on("data", show)
sicksync.stderr.on("data", show)

let failed = false
try {
  await converge("started: the initial big sync")
  put("src/app.ts", 'export const greet = (name: string) => `hello, ${name}!`\n')
  await converge("edited src/app.ts")
  put("assets/logo.bin", Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 31) % 256)))
  await converge("added a binary file in a new directory")
  put("src/components/button/Button.tsx", "export const Button = () => null\n")
  put("debug.log", "excluded by .gitignore: never sent\n")
  await converge("created nested directories (and an excluded log)")
  fs.renameSync(path.join(project, "src/components"), path.join(project, "src/ui"))
  await converge("renamed src/components → src/ui")
  fs.rmSync(path.join(project, "README.md"))
  await converge("deleted README.md")
  console.log(`\nexcluded files on the destination: ${fs.existsSync(path.join(remote, "dist")) || fs.existsSync(path.join(remote, "debug.log")) ? "PRESENT (bug)" : "none"}`)
} catch (error) {
  failed = true
  console.error(`\ndemo failed: ${error.message}`)
} finally {
  sicksync.kill("SIGINT")
  const code = await new Promise((resolve) => sicksync.once("exit", (c) => resolve(c)))
  console.log(`\nsicksync stopped on Ctrl-C (exit code ${code}).`)
  const state = path.join(home, ".sicksync", "daemon.json")
  if (fs.existsSync(state)) {
    try {
      process.kill(JSON.parse(fs.readFileSync(state, "utf8")).pid, "SIGTERM")
    } catch {}
  }
  fs.rmSync(base, { recursive: true, force: true })
  process.exitCode = failed || code !== 0 ? 1 : 0
}

#!/usr/bin/env node
/**
 * Benchmarks, run against the built bundle (dist/sicksync.mjs) on the `local` transport:
 *
 *   scripts/bench latency [--edits N]   save-to-remote latency percentiles, and `cp` as the floor
 *   scripts/bench latency --ssh         the same through a real sshd on 127.0.0.1 (started here, as in
 *                                       the tests), against lsyncd and against rsync run per change
 *   scripts/bench reconcile [--files N] big sync vs `rsync -a --delete`: initial, no-change, checkout
 *
 * Everything happens under a temp dir with its own $HOME (its own daemon), removed at the end.
 */
import { execFileSync, spawn, spawnSync } from "node:child_process"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { performance } from "node:perf_hooks"
import { fileURLToPath } from "node:url"

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
const bundle = path.join(root, "dist", "sicksync.mjs")
const [mode = "latency", ...rest] = process.argv.slice(2)
const flag = (name, fallback) => {
  const i = rest.indexOf(`--${name}`)
  return i >= 0 ? Number(rest[i + 1]) : fallback
}

if (!fs.existsSync(bundle)) {
  console.error(`error: ${bundle} is missing: run \`npm run build\` first (or \`npm run bench\`)`)
  process.exit(1)
}

const base = fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-bench-"))
const home = path.join(base, "home")
const project = path.join(base, "project")
const remote = path.join(base, "remote")
for (const dir of [home, project, remote]) fs.mkdirSync(dir)
fs.writeFileSync(
  path.join(project, ".sicksync-config.json"),
  JSON.stringify({
    project: "bench",
    destinations: [{ name: "local", hostname: "localhost", destinationLocation: remote, transport: "local", websocketPort: 0 }]
  })
)
const env = { ...process.env, HOME: home }
const children = []
const cleanup = () => {
  for (const c of children) c.kill("SIGTERM")
  const state = path.join(home, ".sicksync", "daemon.json")
  if (fs.existsSync(state)) {
    try {
      process.kill(JSON.parse(fs.readFileSync(state, "utf8")).pid, "SIGTERM")
    } catch {}
  }
  fs.rmSync(base, { recursive: true, force: true })
}
process.on("SIGINT", () => {
  cleanup()
  process.exit(130)
})

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const percentile = (sorted, p) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const fmt = (ms) => ms.toFixed(1).padStart(7)

/** Resolves when `file` (in a watched directory) holds `expected`. */
const arrival = (dir, file, expected) =>
  new Promise((resolve) => {
    const check = () => {
      try {
        if (fs.readFileSync(path.join(dir, file), "utf8") === expected) {
          watcher.close()
          resolve(performance.now())
          return true
        }
      } catch {}
      return false
    }
    const watcher = fs.watch(dir, () => check())
    check()
  })

const startDaemon = () =>
  execFileSync(process.execPath, [bundle, "start-daemon", "--port", "0", "--grace-ms", "3600000"], { env, encoding: "utf8" })

// ---- latency ------------------------------------------------------------------------------------

const latency = async () => {
  const edits = flag("edits", 200)
  startDaemon()
  const client = spawn(process.execPath, [bundle], { cwd: project, env, stdio: ["ignore", "pipe", "inherit"] })
  children.push(client)
  let out = ""
  client.stdout.on("data", (d) => (out += d))
  while (!/in sync/.test(out)) await sleep(20)

  const measure = async (label, edit) => {
    const samples = []
    for (let i = 0; i < edits; i++) {
      const content = `${label} edit ${i} ${Math.random()}\n`.repeat(1 + (i % 20))
      const arrived = arrival(remote, "edited.txt", content)
      const t0 = performance.now()
      edit(content)
      samples.push((await arrived) - t0)
      await sleep(flag("gap", 15)) // edits apart, as a person saves: one edit is one batch
    }
    samples.sort((a, b) => a - b)
    return { label, p50: percentile(samples, 50), p95: percentile(samples, 95), p99: percentile(samples, 99) }
  }

  const results = [await measure("sicksync (local transport)", (c) => fs.writeFileSync(path.join(project, "edited.txt"), c))]
  client.kill("SIGTERM")
  const scratch = path.join(base, "scratch.txt")
  results.push(
    await measure("floor: write + cp", (c) => {
      fs.writeFileSync(scratch, c)
      spawnSync("cp", [scratch, path.join(remote, "edited.txt")])
    })
  )
  console.log(`save-to-remote latency over ${edits} single-file edits (ms)`)
  console.log(`${"".padEnd(30)}    p50     p95     p99`)
  for (const r of results) console.log(`${r.label.padEnd(30)}${fmt(r.p50)} ${fmt(r.p95)} ${fmt(r.p99)}`)
}

// ---- latency over SSH ---------------------------------------------------------------------------

/** The tests' sshd harness (TypeScript), bundled on the fly. */
const loadSshHarness = async () => {
  const { build } = await import("esbuild")
  const out = path.join(base, "sshd-harness.mjs")
  await build({ entryPoints: [path.join(root, "test/support/sshd.ts")], bundle: true, platform: "node", format: "esm", outfile: out, packages: "external", logLevel: "warning" })
  return import(out)
}

const latencySsh = async () => {
  const edits = flag("edits", 200)
  const { startSshd, prepareClientHome } = await loadSshHarness()
  const sshd = await startSshd({ dir: path.join(base, "host") })
  children.push({ kill: () => void sshd.stop() })
  const key = prepareClientHome(home, [sshd.knownHostsLine()])
  sshd.authorize(key.publicKey)
  const knownHosts = path.join(home, ".ssh", "known_hosts")
  const user = sshd.account.name
  const sshArgs = `ssh -p ${sshd.port} -i ${key.privatePath} -o UserKnownHostsFile=${knownHosts} -o BatchMode=yes`
  const sshEnv = { ...env, SSH_AUTH_SOCK: "" }
  const remoteDir = (name) => {
    const dir = path.join(sshd.home, name)
    sshd.runAs(`mkdir -p '${dir}'`)
    return dir
  }
  const results = []

  const measure = async (label, dir, edit) => {
    const samples = []
    for (let i = 0; i < edits; i++) {
      const content = `${label} edit ${i} ${Math.random()}\n`.repeat(1 + (i % 20))
      const arrived = arrival(dir, "edited.txt", content)
      const t0 = performance.now()
      edit(content)
      samples.push((await arrived) - t0)
      await sleep(flag("gap", 15))
    }
    samples.sort((a, b) => a - b)
    results.push({ label, p50: percentile(samples, 50), p95: percentile(samples, 95), p99: percentile(samples, 99) })
  }

  // sicksync over SSH: agent upload, remote daemon, port-forwarded WebSocket
  const ours = remoteDir("sicksync")
  fs.writeFileSync(
    path.join(project, ".sicksync-config.json"),
    JSON.stringify({
      project: "bench",
      destinations: [{ name: "devbox", hostname: "127.0.0.1", port: sshd.port, username: user, destinationLocation: ours, websocketPort: 0 }]
    })
  )
  const client = spawn(process.execPath, [bundle], { cwd: project, env: sshEnv, stdio: ["ignore", "pipe", "inherit"] })
  children.push(client)
  let out = ""
  client.stdout.on("data", (d) => (out += d))
  const deadline = Date.now() + 60_000
  while (!/in sync/.test(out)) {
    if (Date.now() > deadline) throw new Error(`sicksync did not get in sync over SSH:\n${out}`)
    await sleep(20)
  }
  await measure("sicksync (ssh)", ours, (c) => fs.writeFileSync(path.join(project, "edited.txt"), c))
  client.kill("SIGTERM")

  // lsyncd with default.rsyncssh and no delay: what the old tools offer
  const lsrc = path.join(base, "lsyncd-src")
  fs.mkdirSync(lsrc)
  const theirs = remoteDir("lsyncd")
  const conf = path.join(base, "lsyncd.conf")
  fs.writeFileSync(
    conf,
    `settings { nodaemon = true, logfile = "${base}/lsyncd.log", statusFile = "${base}/lsyncd.status" }
sync { default.rsyncssh, source = "${lsrc}", host = "${user}@127.0.0.1", targetdir = "${theirs}", delay = 0,
  ssh = { port = ${sshd.port}, identityFile = "${key.privatePath}", options = { UserKnownHostsFile = "${knownHosts}", BatchMode = "yes" } } }
`
  )
  fs.writeFileSync(path.join(lsrc, "ready.txt"), "ready")
  const lsyncd = spawn("lsyncd", [conf], { env: sshEnv, stdio: "ignore" })
  children.push(lsyncd)
  await arrival(theirs, "ready.txt", "ready") // its initial rsync is done
  await measure("lsyncd (rsyncssh, delay 0)", theirs, (c) => fs.writeFileSync(path.join(lsrc, "edited.txt"), c))
  lsyncd.kill("SIGTERM")

  // rsync over ssh, run for every change
  const rsrc = path.join(base, "rsync-src")
  fs.mkdirSync(rsrc)
  const rdst = remoteDir("rsync")
  await measure("rsync per change (ssh)", rdst, (c) => {
    fs.writeFileSync(path.join(rsrc, "edited.txt"), c)
    const r = spawnSync("rsync", ["-a", "-e", sshArgs, path.join(rsrc, "edited.txt"), `${user}@127.0.0.1:${rdst}/`], { env: sshEnv })
    if (r.status !== 0) throw new Error(`rsync failed: ${r.stderr}`)
  })
  await sshd.stop()

  console.log(`save-to-remote latency over ${edits} single-file edits through sshd on 127.0.0.1 (ms)`)
  console.log(`${"".padEnd(30)}    p50     p95     p99`)
  for (const r of results) console.log(`${r.label.padEnd(30)}${fmt(r.p50)} ${fmt(r.p95)} ${fmt(r.p99)}`)
}

// ---- reconcile ----------------------------------------------------------------------------------

const reconcile = async () => {
  const files = flag("files", 20_000)
  const dirs = Math.max(1, Math.round(files / 10))
  const runs = flag("runs", 3)
  const bytesEach = Math.round((200 * 1024 * 1024) / 20_000)
  const src = path.join(project, "tree")
  console.log(`generating ${files} files in ${dirs} directories, ${((files * bytesEach) / 1024 ** 2).toFixed(0)} MB…`)
  const blob = (i) => {
    const b = Buffer.alloc(bytesEach)
    b.writeUInt32LE(i, 0)
    return b
  }
  for (let i = 0; i < files; i++) {
    const dir = path.join(src, `d${Math.floor(i / 100) % 20}`, `e${i % dirs}`)
    fs.mkdirSync(dir, { recursive: true })
    fs.writeFileSync(path.join(dir, `f${i}.bin`), blob(i))
  }
  const checkout = (round) => {
    // modify 2,000, add 2,000, delete 1,000: 5,000 paths touched
    const scale = files / 20_000
    for (let i = 0; i < 2000 * scale; i++) {
      const n = (i * 7) % files
      const file = path.join(src, `d${Math.floor(n / 100) % 20}`, `e${n % dirs}`, `f${n}.bin`)
      if (fs.existsSync(file)) fs.writeFileSync(file, `round ${round} ${i}`)
    }
    for (let i = 0; i < 2000 * scale; i++) {
      const dir = path.join(src, `new${round}`, `g${i % 200}`)
      fs.mkdirSync(dir, { recursive: true })
      fs.writeFileSync(path.join(dir, `n${i}.bin`), blob(i))
    }
    for (let i = 0; i < 1000 * scale; i++) {
      const n = (i * 13 + round) % files
      fs.rmSync(path.join(src, `d${Math.floor(n / 100) % 20}`, `e${n % dirs}`, `f${n}.bin`), { force: true })
    }
  }
  startDaemon()
  const time = (f) => {
    const t0 = performance.now()
    f()
    return performance.now() - t0
  }
  const sicksyncOnce = () => {
    const r = spawnSync(process.execPath, [bundle, "once", "--force"], { cwd: project, env, encoding: "utf8" })
    if (r.status !== 0) throw new Error(`sicksync once failed: ${r.stderr.slice(-1500)}`)
  }
  const rsyncDest = path.join(base, "rsync-dest")
  const rsync = () => {
    const r = spawnSync("rsync", ["-a", "--delete", `${project}/`, `${rsyncDest}/`], { encoding: "utf8" })
    if (r.status !== 0) throw new Error(`rsync failed: ${r.stderr}`)
  }
  const dropCaches = () => spawnSync("sync")
  const rows = { initial: [[], []], noChange: [[], []], checkout: [[], []] }
  for (let run = 0; run < runs; run++) {
    fs.rmSync(remote, { recursive: true, force: true })
    fs.mkdirSync(remote)
    fs.rmSync(rsyncDest, { recursive: true, force: true })
    fs.mkdirSync(rsyncDest)
    dropCaches()
    rows.initial[0].push(time(sicksyncOnce))
    rows.initial[1].push(time(rsync))
    rows.noChange[0].push(time(sicksyncOnce))
    rows.noChange[1].push(time(rsync))
    checkout(run)
    dropCaches()
    rows.checkout[0].push(time(sicksyncOnce))
    rows.checkout[1].push(time(rsync))
    const differences = spawnSync("diff", ["-rq", project, remote], { encoding: "utf8" }).stdout.trim()
    if (differences !== "") throw new Error(`sicksync's destination differs:\n${differences.slice(0, 2000)}`)
  }
  console.log(`reconcile, median of ${runs} (ms; the daemon already running, each run a fresh CLI process)`)
  console.log(`${"".padEnd(28)}sicksync     rsync   ratio`)
  for (const [label, [ours, theirs]] of [
    ["(a) initial, empty dest", rows.initial],
    ["(b) no-change rerun", rows.noChange],
    ["(c) after 5,000-path checkout", rows.checkout]
  ]) {
    const a = median(ours)
    const b = median(theirs)
    console.log(`${label.padEnd(28)}${a.toFixed(0).padStart(8)}  ${b.toFixed(0).padStart(8)}  ${(a / b).toFixed(2).padStart(6)}`)
  }
}

try {
  if (mode === "latency") await (rest.includes("--ssh") ? latencySsh() : latency())
  else if (mode === "reconcile") await reconcile()
  else {
    console.error(`error: unknown benchmark "${mode}": expected latency or reconcile`)
    process.exitCode = 2
  }
} finally {
  cleanup()
}

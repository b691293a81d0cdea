#!/usr/bin/env node
/**
 * Benchmarks, run against the built bundle (dist/sicksync.mjs) on the `local` transport:
 *
 *   scripts/bench latency [--edits N]   save-to-remote latency percentiles, and `cp` as the floor
 *   scripts/bench latency --ssh         the same through a real sshd on 127.0.0.1 (started here, as in
 *                                       the tests), against lsyncd and against rsync run per change
 *   scripts/bench reconcile [--files N] [--runs N]
 *                                       big sync vs `rsync -a --delete`: initial, no-change, checkout
 *   scripts/bench reconcile --ssh       the same through a real sshd on 127.0.0.1, against rsync over
 *                                       that sshd
 *   scripts/bench independence [--edits N]
 *                                       latency to one destination while another of the same project
 *                                       (through a loopback TCP proxy) is healthy, then blackholed
 *   scripts/bench scale [--projects N] [--files N] [--edits N] [--hosts 1|2] [--trace]
 *                                       N projects × 2 destinations in one `sicksync --all` process,
 *                                       over SSH to sshd on 127.0.0.1: start-up until every destination
 *                                       is in sync (cold and warm), RSS of the client and of one remote
 *                                       daemon, save-to-remote percentiles while all are running
 *                                       (--trace: the client's output, timed, on stderr)
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
/** The bench project's config: project "bench" with these destinations. */
const writeConfig = (destinations) =>
  fs.writeFileSync(path.join(project, ".sicksync-config.json"), JSON.stringify({ project: "bench", destinations }))
writeConfig([{ name: "local", hostname: "localhost", destinationLocation: remote, transport: "local", websocketPort: 0 }])
const env = { ...process.env, HOME: home }
// Set on this project's VMs for their npm proxy: every Node process then parses its ~140 CA certificates
// as it starts, 38 ms here (`node -e 0` 60 -> 22 ms), which rsync never pays and sicksync (no TLS) has
// no use for. Measured without it, and said so.
if (env.NODE_EXTRA_CA_CERTS !== undefined) {
  delete env.NODE_EXTRA_CA_CERTS
  console.log("(NODE_EXTRA_CA_CERTS is unset for the tools measured: it adds ~38 ms to every Node start here)")
}
const sshEnv = { ...env, SSH_AUTH_SOCK: "" }
/** The pid in `<dir>/.sicksync/daemon.json` (the daemon of the user whose $HOME is dir), if any. */
const daemonPidOf = (dir) => {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, ".sicksync", "daemon.json"), "utf8")).pid
  } catch {
    return undefined
  }
}
/** Stops that daemon and waits (up to 5 s) until it has exited: on its way out it removes its state files. */
const stopDaemonOf = (dir) => {
  const pid = daemonPidOf(dir)
  if (pid === undefined) return
  try {
    process.kill(pid, "SIGTERM")
    const deadline = Date.now() + 5000
    for (;;) {
      process.kill(pid, 0) // throws once it is gone
      if (Date.now() > deadline) return
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20)
    }
  } catch {}
}
const children = []
const cleanup = () => {
  for (const c of children) c.kill("SIGTERM")
  stopDaemonOf(home)
  fs.rmSync(base, { recursive: true, force: true })
}
process.on("SIGINT", () => {
  cleanup()
  process.exit(130)
})

/** A tool the benchmark needs is not installed: said in one line, without a stack. */
class MissingTool extends Error {}

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

/** `rsync ...args`, failing loudly. */
const rsync = (args, rsyncEnv = env) => {
  const r = spawnSync("rsync", args, { env: rsyncEnv, encoding: "utf8" })
  if (r.status !== 0) throw new Error(`rsync ${args.join(" ")} failed (${r.status}): ${r.stderr}${r.error?.message ?? ""}`)
}

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
/** A module of the tests' harness (`test/support/<name>.ts`), bundled for this run. */
const loadSupport = async (name) => {
  const { build } = await import("esbuild")
  const out = path.join(base, `${name}-harness.mjs`)
  await build({ entryPoints: [path.join(root, `test/support/${name}.ts`)], bundle: true, platform: "node", format: "esm", outfile: out, packages: "external", logLevel: "warning" })
  return import(out)
}
const loadSshHarness = () => loadSupport("sshd")

/**
 * One sshd on 127.0.0.1 (the tests' harness) that the bench's $HOME trusts and logs in to with its own
 * key: `sshArgs` is the matching `rsync -e`, `remoteDir` makes a directory the session user owns,
 * `destination` is a sicksync destination there. Stopped (its sicksync daemon too) at cleanup.
 */
const sshHost = async () => {
  const { startSshd, prepareClientHome, SSHD } = await loadSshHarness()
  for (const [what, found] of [[SSHD, fs.existsSync(SSHD)], ["rsync", spawnSync("rsync", ["--version"]).error === undefined]]) {
    if (!found) throw new MissingTool(`${what} is missing: the SSH benchmarks need OpenSSH's server and rsync (apt-get install openssh-server rsync)`)
  }
  const sshd = await startSshd({ dir: path.join(base, "host") })
  children.push({
    kill: () => {
      stopDaemonOf(sshd.home)
      void sshd.stop()
    }
  })
  const key = prepareClientHome(home, [sshd.knownHostsLine()])
  sshd.authorize(key.publicKey)
  const knownHosts = path.join(home, ".ssh", "known_hosts")
  const user = sshd.account.name
  return {
    sshd,
    knownHosts,
    key,
    user,
    sshArgs: `ssh -p ${sshd.port} -i ${key.privatePath} -o UserKnownHostsFile=${knownHosts} -o BatchMode=yes`,
    remoteDir: (name) => {
      const dir = path.join(sshd.home, name)
      sshd.runAs(`mkdir -p '${dir}'`)
      return dir
    },
    destination: (dir) => ({ name: "devbox", hostname: "127.0.0.1", port: sshd.port, username: user, destinationLocation: dir, websocketPort: 0 })
  }
}

const latencySsh = async () => {
  const edits = flag("edits", 200)
  const { sshd, knownHosts, key, user, sshArgs, remoteDir, destination } = await sshHost()
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
  writeConfig([destination(ours)])
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
  const haveLsyncd = spawnSync("lsyncd", ["-version"]).error === undefined
  if (!haveLsyncd) console.error("lsyncd is not installed (apt-get install lsyncd): its row is left out")
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
  if (haveLsyncd) {
    const lsyncd = spawn("lsyncd", [conf], { env: sshEnv, stdio: "ignore" })
    children.push(lsyncd)
    await arrival(theirs, "ready.txt", "ready") // its initial rsync is done
    await measure("lsyncd (rsyncssh, delay 0)", theirs, (c) => fs.writeFileSync(path.join(lsrc, "edited.txt"), c))
    lsyncd.kill("SIGTERM")
  }

  // rsync over ssh, run for every change
  const rsrc = path.join(base, "rsync-src")
  fs.mkdirSync(rsrc)
  const rdst = remoteDir("rsync")
  await measure("rsync per change (ssh)", rdst, (c) => {
    fs.writeFileSync(path.join(rsrc, "edited.txt"), c)
    rsync(["-a", "-e", sshArgs, path.join(rsrc, "edited.txt"), `${user}@127.0.0.1:${rdst}/`], sshEnv)
  })
  await sshd.stop()

  console.log(`save-to-remote latency over ${edits} single-file edits through sshd on 127.0.0.1 (ms)`)
  console.log(`${"".padEnd(30)}    p50     p95     p99`)
  for (const r of results) console.log(`${r.label.padEnd(30)}${fmt(r.p50)} ${fmt(r.p95)} ${fmt(r.p99)}`)
}

// ---- independence -------------------------------------------------------------------------------

/**
 * Two destinations of one project on one sshd: `direct`, and `proxied` through a loopback TCP proxy.
 * Save-to-remote latency to `direct` while `proxied` is healthy, then while it is blackholed (its
 * link stalls, is declared lost, and keeps being retried).
 */
const independence = async () => {
  const edits = flag("edits", 200)
  const { sshd, user, remoteDir } = await sshHost()
  const { startProxy } = await loadSupport("proxy")
  const proxy = await startProxy({ host: "127.0.0.1", port: sshd.port })
  children.push({ kill: () => void proxy.close() })
  fs.appendFileSync(path.join(home, ".ssh", "known_hosts"), `${sshd.knownHostsLine({ port: proxy.port })}\n`)
  const direct = remoteDir("direct")
  const proxied = remoteDir("proxied")
  const dest = (name, port, dir) => ({ name, hostname: "127.0.0.1", port, username: user, destinationLocation: dir, websocketPort: 0 })
  writeConfig([dest("direct", sshd.port, direct), dest("proxied", proxy.port, proxied)])
  const client = spawn(process.execPath, [bundle], { cwd: project, env: sshEnv, stdio: ["ignore", "pipe", "pipe"] })
  children.push(client)
  let out = ""
  client.stdout.on("data", (d) => (out += d))
  client.stderr.on("data", (d) => (out += d)) // warnings (a lost connection) are on stderr
  const waitFor = async (pattern, what) => {
    const deadline = Date.now() + 60_000
    while (!pattern.test(out)) {
      if (Date.now() > deadline) throw new Error(`sicksync: no ${what}:\n${out}`)
      await sleep(20)
    }
  }
  await waitFor(/\[direct\] in sync[^]*\[proxied\] in sync|\[proxied\] in sync[^]*\[direct\] in sync/, "in sync on both destinations")

  const lost = () => /\[proxied\].*connection lost/.test(out)
  /** `edits` edits; with `untilLost`, also as long as it takes for the link to be declared lost, and `edits` more after. */
  const measure = async (label, untilLost = false) => {
    const samples = []
    let afterLoss = 0
    const deadline = Date.now() + 60_000
    for (let i = 0; i < edits || (untilLost && afterLoss < edits); i++) {
      if (untilLost && lost()) afterLoss++
      if (Date.now() > deadline) throw new Error(`the blackholed link was not declared lost within 60 s:\n${out}`)
      const content = `${label} edit ${i} ${Math.random()}\n`.repeat(1 + (i % 20))
      const arrived = arrival(direct, "edited.txt", content)
      const t0 = performance.now()
      fs.writeFileSync(path.join(project, "edited.txt"), content)
      samples.push((await arrived) - t0)
      await sleep(flag("gap", 15))
    }
    samples.sort((a, b) => a - b)
    return { label, samples: samples.length, p50: percentile(samples, 50), p95: percentile(samples, 95), p99: percentile(samples, 99) }
  }
  const healthy = await measure("proxied healthy")
  proxy.setMode("blackhole")
  const blackholed = await measure("proxied blackholed", true)
  client.kill("SIGTERM")
  await proxy.close()
  await sshd.stop()

  console.log(`save-to-remote latency to "direct" (ms), while "proxied" (same project, same sshd, through a loopback proxy) is`)
  console.log(`${"".padEnd(22)}    p50     p95     p99`)
  for (const r of [healthy, blackholed]) console.log(`${r.label.padEnd(22)}${fmt(r.p50)} ${fmt(r.p95)} ${fmt(r.p99)}`)
  console.log(`p50 ratio ${(blackholed.p50 / healthy.p50).toFixed(2)} (target ≤ 1.5); blackholed: ${blackholed.samples} edits, spanning the stall, the loss and the retries`)
}

// ---- scale ----------------------------------------------------------------------------------------

/** VmRSS and VmHWM (peak) of a process, in MiB. */
const memoryOf = (pid) => {
  const status = fs.readFileSync(`/proc/${pid}/status`, "utf8")
  const kib = (field) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN)
  return { rss: kib("VmRSS") / 1024, hwm: kib("VmHWM") / 1024 }
}

const scale = async () => {
  const projectCount = flag("projects", 20)
  const filesEach = flag("files", 50)
  const edits = flag("edits", 100)
  const hostCount = flag("hosts", 1)
  const { startSshd, prepareClientHome } = await loadSshHarness()
  const hosts = []
  for (let i = 0; i < hostCount; i++) {
    const sshd = await startSshd({ dir: path.join(base, `host${i + 1}`) })
    hosts.push(sshd)
    children.push({
      kill: () => {
        // This benchmark's daemons go with it, not after their grace period.
        stopDaemonOf(sshd.home)
        void sshd.stop()
      }
    })
  }
  const key = prepareClientHome(home, hosts.map((h) => h.knownHostsLine()))
  for (const h of hosts) h.authorize(key.publicKey)

  // Projects p01…pN, each with a few small files, both destinations on host 1 (or a on host 1 and
  // b on host 2 with --hosts 2), all in the registry.
  const names = Array.from({ length: projectCount }, (_, i) => `p${String(i + 1).padStart(2, "0")}`)
  const dests = ["a", "b"]
  const hostOf = (dest) => hosts[dest === "a" || hosts.length === 1 ? 0 : 1]
  const sourceOf = (name) => path.join(base, "projects", name)
  const remoteOf = (name, dest) => path.join(hostOf(dest).home, "scale", `${name}-${dest}`)
  for (const name of names) {
    const src = sourceOf(name)
    fs.mkdirSync(path.join(src, "src"), { recursive: true })
    fs.writeFileSync(
      path.join(src, ".sicksync-config.json"),
      JSON.stringify({
        project: name,
        destinations: dests.map((dest) => ({
          name: dest,
          hostname: "127.0.0.1",
          port: hostOf(dest).port,
          username: hostOf(dest).account.name,
          destinationLocation: `~/scale/${name}-${dest}`,
          websocketPort: 0
        }))
      })
    )
    for (let f = 0; f < filesEach; f++) fs.writeFileSync(path.join(src, "src", `file${f}.ts`), `// ${name} ${f}\n`.repeat(1 + (f % 40)))
    fs.writeFileSync(path.join(src, "edited.txt"), "initial")
  }
  fs.writeFileSync(
    path.join(home, ".sicksync-config.json"),
    JSON.stringify({ projects: names.map((name) => ({ path: sourceOf(name), alias: name, active: true })) })
  )

  /** Starts `sicksync --all`; resolves with the client and the ms until every destination said "in sync". */
  const startAll = async () => {
    const t0 = performance.now()
    const client = spawn(process.execPath, [bundle, "--all"], { cwd: base, env: sshEnv, stdio: ["ignore", "pipe", "pipe"] })
    children.push(client)
    let out = ""
    const inSync = new Set()
    let done
    const all = new Promise((resolve) => (done = resolve))
    const onLine = (line) => {
      if (rest.includes("--trace")) console.error(`${(performance.now() - t0).toFixed(0).padStart(6)} ${line}`)
      const m = /^\[(p\d+)\] \[(\w+)\] in sync/.exec(line)
      if (m !== null) inSync.add(`${m[1]}/${m[2]}`)
      if (inSync.size === names.length * dests.length) done(performance.now() - t0)
    }
    let pending = ""
    const onData = (d) => {
      out += d
      pending += d
      const lines = pending.split("\n")
      pending = lines.pop()
      lines.forEach(onLine)
    }
    client.stdout.on("data", onData)
    client.stderr.on("data", onData)
    let timer
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`not every destination got in sync within 180 s (${inSync.size} of ${names.length * dests.length}):\n${out.slice(-3000)}`)),
        180_000
      )
    })
    const ms = await Promise.race([all, timeout]).finally(() => clearTimeout(timer))
    return { client, ms, output: () => out }
  }
  const stop = (client) =>
    new Promise((resolve) => {
      client.once("exit", (code) => resolve(code))
      client.kill("SIGTERM")
    })

  const cold = await startAll()
  const coldSynced = names.every((name) => dests.every((d) => fs.existsSync(path.join(remoteOf(name, d), "src", `file${filesEach - 1}.ts`))))
  if (!coldSynced) throw new Error("in sync was reported, but a destination is missing files")
  if ((await stop(cold.client)) !== 0) throw new Error(`sicksync --all did not exit 0 on SIGTERM:\n${cold.output().slice(-3000)}`)

  const loginsOf = () => hosts.map((h) => h.log().split("\n").filter((l) => l.includes("Accepted publickey")).length)
  const coldLogins = loginsOf()

  // Warm: the daemons are running and every destination is already up to date.
  const { client, ms: warmMs, output } = await startAll()
  await sleep(1000) // let start-up garbage settle before the idle reading
  const clientIdle = memoryOf(client.pid)
  const daemonIdle = memoryOf(daemonPidOf(hosts[0].home))

  // Edits spread round-robin over the projects, each timed to its arrival on both destinations.
  const perDest = []
  const onAll = []
  for (let i = 0; i < edits; i++) {
    const name = names[i % names.length]
    const content = `scale edit ${i} ${Math.random()}\n`.repeat(1 + (i % 20))
    const arrivals = dests.map((d) => arrival(remoteOf(name, d), "edited.txt", content))
    const t0 = performance.now()
    fs.writeFileSync(path.join(sourceOf(name), "edited.txt"), content)
    const times = (await Promise.all(arrivals)).map((t) => t - t0)
    perDest.push(...times)
    onAll.push(Math.max(...times))
    await sleep(flag("gap", 15))
  }
  const clientAfter = memoryOf(client.pid)
  const daemonAfter = memoryOf(daemonPidOf(hosts[0].home))
  const daemonsPerHost = hosts.map(
    (h) =>
      fs.readdirSync("/proc").filter((entry) => {
        try {
          const argv = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0")
          return argv.includes("daemon") && argv.some((a) => a.startsWith(h.home + path.sep))
        } catch {
          return false
        }
      }).length
  )
  const warmLogins = loginsOf().map((n, i) => n - coldLogins[i])
  if ((await stop(client)) !== 0) throw new Error(`sicksync --all did not exit 0 on SIGTERM:\n${output().slice(-3000)}`)
  for (const h of hosts) await h.stop()

  perDest.sort((a, b) => a - b)
  onAll.sort((a, b) => a - b)
  const mb = (m) => `${m.rss.toFixed(0)} MB (peak ${m.hwm.toFixed(0)} MB)`
  const rows = [
    ["start-up to all in sync, cold", `${cold.ms.toFixed(0)} ms (agent upload, daemon start, ${projectCount * filesEach} files sent)`],
    ["start-up to all in sync, warm", `${warmMs.toFixed(0)} ms (daemon running, nothing to send)`],
    ["client RSS, idle", mb(clientIdle)],
    [`client RSS, after ${edits} edits`, mb(clientAfter)],
    ["remote daemon RSS, idle", mb(daemonIdle)],
    [`remote daemon RSS, after ${edits} edits`, mb(daemonAfter)],
    ["SSH logins per host, warm run", warmLogins.join(", ")],
    ["remote daemons per host", daemonsPerHost.join(", ")]
  ]
  console.log(
    `scale: ${projectCount} projects × ${dests.length} destinations in one \`sicksync --all\` process, ` +
      `${hostCount === 1 ? "one sshd" : `${hostCount} sshd instances`} on 127.0.0.1`
  )
  for (const [label, value] of rows) console.log(`${label.padEnd(40)}${value}`)
  console.log(`save-to-remote latency over ${edits} edits spread over the projects (ms)`)
  console.log(`${"".padEnd(40)}    p50     p95     p99`)
  for (const [label, xs] of [
    ["each destination", perDest],
    ["both destinations", onAll]
  ]) {
    console.log(`${label.padEnd(40)}${fmt(percentile(xs, 50))} ${fmt(percentile(xs, 95))} ${fmt(percentile(xs, 99))}`)
  }
}

// ---- reconcile ----------------------------------------------------------------------------------

/** Every entry below dir, sorted: path, type and mode; size and mtime (to the second) of files; link targets. */
const listing = (dir) => {
  const out = []
  const walk = (rel) => {
    for (const name of fs.readdirSync(path.join(dir, rel))) {
      const entry = path.join(rel, name)
      const st = fs.lstatSync(path.join(dir, entry))
      const mode = (st.mode & 0o7777).toString(8)
      if (st.isSymbolicLink()) out.push(`${entry} link ${fs.readlinkSync(path.join(dir, entry))}`)
      else if (st.isDirectory()) {
        out.push(`${entry} dir ${mode}`)
        walk(entry)
      } else out.push(`${entry} file ${mode} ${st.size} ${Math.floor(st.mtimeMs / 1000)}`)
    }
  }
  walk("")
  return out.sort()
}

/** Throws unless `copy` is `source` again: the same listing, and the same bytes (`diff -rq`). */
const assertSameTree = (who, source, copy) => {
  const [theirs, ours] = [listing(source), listing(copy)]
  const [inSource, inCopy] = [new Set(theirs), new Set(ours)]
  const listed = [...theirs.filter((e) => !inCopy.has(e)).map((e) => `- ${e}`), ...ours.filter((e) => !inSource.has(e)).map((e) => `+ ${e}`)]
  const diff = spawnSync("diff", ["-rq", source, copy], { encoding: "utf8" })
  if (listed.length > 0 || diff.status !== 0) {
    throw new Error(
      `${who}'s destination ${copy} differs from the source (- source only, + destination only):\n` +
        `${listed.slice(0, 20).join("\n")}\n${(diff.stdout + diff.stderr).slice(0, 2000)}`
    )
  }
}

/**
 * Moves a destination of the previous run out of the way (~400 MB a run), to be deleted with
 * everything else at the end. Deleting it here would slow down the next run's file creation for both
 * tools: ext4 without a journal (as here) does not reuse an inode for 60 s after its deletion (Linux
 * 5.7 and later; 360 s while its inode table block is not yet written back, hence the `sync` first),
 * and skipping tens of thousands of them cost each new file ~280 µs instead of 35–125 µs (measured),
 * which pulled the (a) figures of runs 2 and 3 towards each other.
 */
const INODE_REUSE_MS = 61_000
const setAside = (dir) => {
  if (!fs.existsSync(dir)) return
  const trash = path.join(base, "trash")
  fs.mkdirSync(trash, { recursive: true })
  fs.renameSync(dir, fs.mkdtempSync(path.join(trash, "run-")) + "/" + path.basename(dir))
}

/** Where `reconcile` sends the tree: sicksync's destination (local transport) and rsync's, on this machine. */
const localTargets = () => {
  startDaemon()
  const rsyncDest = path.join(base, "rsync-dest")
  return {
    setting: "local transport, rsync to a local directory",
    ours: remote,
    theirs: rsyncDest,
    reset: () => {
      for (const dir of [remote, rsyncDest]) {
        setAside(dir)
        fs.mkdirSync(dir)
      }
    },
    rsync: () => rsync(["-a", "--delete", `${project}/`, `${rsyncDest}/`]),
    sicksyncEnv: env,
    finish: () => "the daemon already running"
  }
}

/** The same through one sshd on 127.0.0.1 for both, to two directories in the session user's $HOME. */
const sshTargets = async () => {
  const { sshd, user, sshArgs, remoteDir, destination } = await sshHost()
  const [ours, theirs] = [remoteDir("sicksync"), remoteDir("rsync")]
  writeConfig([destination(ours)])
  // The remote daemon, started as the local variant starts its own (long grace): every run finds it running.
  const started = sshd.runAs(`exec '${process.execPath}' '${bundle}' start-daemon --port 0 --grace-ms 3600000`)
  if (started.code !== 0) throw new Error(`the remote daemon did not start: ${started.stderr}`)
  const pid = JSON.parse(started.stdout).pid
  return {
    setting: `over SSH: sshd on 127.0.0.1:${sshd.port}, user ${user}; rsync -e "ssh" through the same sshd`,
    ours,
    theirs,
    reset: () => {
      for (const dir of [ours, theirs]) setAside(dir)
      for (const dir of [ours, theirs]) remoteDir(path.basename(dir))
    },
    rsync: () => rsync(["-a", "--delete", "-e", sshArgs, `${project}/`, `${user}@127.0.0.1:${theirs}/`], sshEnv),
    sicksyncEnv: sshEnv,
    finish: () => {
      if (daemonPidOf(sshd.home) !== pid) throw new Error(`the remote daemon (pid ${pid}) was replaced by ${daemonPidOf(sshd.home)}`)
      process.kill(pid, 0) // throws if it is gone
      return `the remote daemon already running (pid ${pid}, the same in every run; each run also opens its SSH connection)`
    }
  }
}

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
  const target = rest.includes("--ssh") ? await sshTargets() : localTargets()
  // The client's first run in a new $HOME compiles the bundle without V8's code cache, and writes the
  // cache at its end: its initial sync measured 0.2–0.6 s slower (3 pairs). Runs are timed as a user
  // meets them after a first one, here a dry run (connect, walk, compare; it changes nothing).
  const warmed = spawnSync(process.execPath, [bundle, "once", "--dry-run"], { cwd: project, env: target.sicksyncEnv, encoding: "utf8", stdio: ["ignore", "ignore", "pipe"] })
  if (warmed.status !== 0) throw new Error(`sicksync once --dry-run failed: ${warmed.stderr}`)
  const time = (f) => {
    const t0 = performance.now()
    f()
    return performance.now() - t0
  }
  const sicksyncOnce = () => {
    const r = spawnSync(process.execPath, [bundle, "once", "--force"], { cwd: project, env: target.sicksyncEnv, encoding: "utf8" })
    if (r.status !== 0) throw new Error(`sicksync once failed: ${r.stderr.slice(-1500)}`)
  }
  /**
   * Writes back dirty pages, then reads every file of the source and of both destinations: neither
   * tool's reads are timed cold. The wait before (a) would otherwise let the page cache go cold
   * unevenly: this VM's kernel runs DAMON with a pageout scheme (pages unused for 60 s are reclaimed),
   * and a sicksync client reading a cold tree measured 7.0-9.0 s against a warm 4.1-4.4 s (rsync cold
   * 5.1-5.2 s, warm 3.8-4.3 s).
   */
  const buffer = Buffer.allocUnsafe(1024 * 1024)
  const readAll = (dir) => {
    if (!fs.existsSync(dir)) return
    for (const entry of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
      if (!entry.isFile()) continue
      const fd = fs.openSync(path.join(entry.parentPath ?? entry.path, entry.name), "r")
      while (fs.readSync(fd, buffer, 0, buffer.byteLength, null) > 0);
      fs.closeSync(fd)
    }
  }
  const writeBack = () => {
    spawnSync("sync")
    for (const dir of [project, target.ours, target.theirs]) readAll(dir)
  }
  /**
   * One timed sicksync and one timed rsync, then both destinations checked against the source. Each
   * starts after a sync, with nothing of the other's left to write back; who goes first alternates by
   * run all the same (the filesystem without a journal here is slower to create inodes soon after deletions).
   */
  const step = ([ours, theirs], run) => {
    const timeOurs = () => {
      writeBack()
      ours.push(time(sicksyncOnce))
    }
    const timeTheirs = () => {
      writeBack()
      theirs.push(time(target.rsync))
    }
    if (run % 2 === 0) {
      timeOurs()
      timeTheirs()
    } else {
      timeTheirs()
      timeOurs()
    }
    assertSameTree("sicksync", project, target.ours)
    assertSameTree("rsync", project, target.theirs)
  }
  const rows = { initial: [[], []], noChange: [[], []], checkout: [[], []] }
  for (let run = 0; run < runs; run++) {
    target.reset()
    // The previous run's checkout deleted files (see setAside): let their inodes age first.
    if (run > 0) await sleep(INODE_REUSE_MS)
    step(rows.initial, run)
    step(rows.noChange, run)
    checkout(run)
    writeBack()
    step(rows.checkout, run)
  }
  console.log(`reconcile, ${target.setting}; median of ${runs} (ms)`)
  console.log(`sicksync: ${target.finish()}, each run a fresh \`sicksync once\` CLI process`)
  console.log("both destinations checked against the source after every step (listing with modes, sizes, mtimes; diff -rq)")
  console.log(`${"".padEnd(28)}sicksync     rsync   ratio`)
  for (const [label, [ours, theirs]] of [
    ["(a) initial, empty dest", rows.initial],
    ["(b) no-change rerun", rows.noChange],
    [`(c) after ${(5000 * (files / 20_000)).toLocaleString("en-US")}-path checkout`, rows.checkout]
  ]) {
    const a = median(ours)
    const b = median(theirs)
    console.log(`${label.padEnd(28)}${a.toFixed(0).padStart(8)}  ${b.toFixed(0).padStart(8)}  ${(a / b).toFixed(2).padStart(6)}`)
  }
  console.log("every run (sicksync / rsync, ms):")
  for (const [label, [ours, theirs]] of [["(a)", rows.initial], ["(b)", rows.noChange], ["(c)", rows.checkout]]) {
    console.log(`  ${label} ${ours.map((x, i) => `${x.toFixed(0)} / ${theirs[i].toFixed(0)}`).join(", ")}`)
  }
}

try {
  if (mode === "latency") await (rest.includes("--ssh") ? latencySsh() : latency())
  else if (mode === "reconcile") await reconcile()
  else if (mode === "independence") await independence()
  else if (mode === "scale") await scale()
  else {
    console.error(`error: unknown benchmark "${mode}": expected latency, reconcile, independence or scale`)
    process.exitCode = 2
  }
} catch (e) {
  if (!(e instanceof MissingTool)) throw e
  console.error(`error: ${e.message}`)
  process.exitCode = 1
} finally {
  cleanup()
}

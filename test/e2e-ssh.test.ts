/**
 * End to end over the `ssh` transport: the real CLI bundle against real OpenSSH sshd instances on
 * 127.0.0.1 (each with its own host key, config and session $HOME, so two of them behave like two
 * hosts), with nothing installed on the "remote" beyond Node. Links are cut with a loopback TCP proxy.
 *
 * `.sicksync-config.json` is left out of tree comparisons: whether files that exist before the
 * client starts are pushed depends on initial reconciliation, which is not what is tested here.
 */
import { createHash } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { spawn, spawnSync } from "node:child_process"
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest"
import { bundle, ensureBundle, repoRoot, run, type Running, start, waitUntil } from "./support/cli.js"
import { startProxy, type Proxy } from "./support/proxy.js"
import { daemonsOf, generateKey, prepareClientHome, type Sshd, startSshd } from "./support/sshd.js"
import { waitForIdentical } from "./support/tree.js"

const VERSION = (JSON.parse(fs.readFileSync(path.join(repoRoot, "package.json"), "utf8")) as { version: string }).version
const skip = (rel: string) => rel === ".sicksync-config.json"
const converged = (source: string, destination: string, timeoutMs = 30_000) =>
  waitForIdentical(source, destination, { skip, mtime: true, timeoutMs })

// ---- the world: client home, project, hosts ---------------------------------------------------

interface World {
  readonly base: string
  readonly home: string
  readonly hosts: Array<Sshd>
  readonly clients: Array<Running>
  readonly proxies: Array<Proxy>
}

const worlds: Array<World> = []

const newWorld = async (name: string, hostCount: number, options: { path?: string } = {}): Promise<World> => {
  const base = fs.mkdtempSync(path.join(os.tmpdir(), `sicksync-ssh-${name}-`))
  const hosts: Array<Sshd> = []
  for (let i = 0; i < hostCount; i++) {
    hosts.push(await startSshd({ dir: path.join(base, `host${i + 1}`), ...(options.path !== undefined ? { path: options.path } : {}) }))
  }
  const home = path.join(base, "client")
  // Host 1 plain, host 2 hashed: both known_hosts forms are exercised.
  const key = prepareClientHome(home, hosts.map((h, i) => h.knownHostsLine({ hashed: i % 2 === 1 })))
  for (const h of hosts) h.authorize(key.publicKey)
  const world = { base, home, hosts, clients: [], proxies: [] }
  worlds.push(world)
  return world
}

interface DestSpec {
  readonly name: string
  readonly host: Sshd
  readonly dir: string
  readonly port?: number
  /** A Host alias from ~/.ssh/config, which then supplies HostName, Port, User and the key. */
  readonly alias?: string
}

const newProject = (world: World, name: string, dests: ReadonlyArray<DestSpec>) => {
  const project = path.join(world.base, name)
  fs.mkdirSync(project, { recursive: true })
  fs.writeFileSync(
    path.join(project, ".sicksync-config.json"),
    JSON.stringify({
      project: name,
      destinations: dests.map((d) => ({
        name: d.name,
        destinationLocation: `~/${d.dir}`,
        websocketPort: 0,
        ...(d.alias !== undefined
          ? { hostname: d.alias }
          : { hostname: "127.0.0.1", port: d.port ?? d.host.port, username: d.host.account.name })
      }))
    })
  )
  return project
}

// An agent from the developer's shell must not stand in for the key the test prepared.
const env = { SSH_AUTH_SOCK: "" }

const startClient = (world: World, project: string, args: ReadonlyArray<string> = []) => {
  const client = start(args, { cwd: project, home: world.home, env })
  world.clients.push(client)
  return client
}

const count = (client: Running, pattern: RegExp) => client.lines.filter((l) => pattern.test(l)).length



const stateOf = (host: Sshd) =>
  JSON.parse(fs.readFileSync(path.join(host.home, ".sicksync", "daemon.json"), "utf8")) as { pid: number; port: number; version: string }

/** SSH logins the host's sshd accepted so far. */
const logins = (host: Sshd) => host.log().split("\n").filter((l) => l.includes("Accepted publickey")).length

const agentOf = (host: Sshd) => path.join(host.home, ".sicksync", "agents", VERSION, "sicksync.mjs")

const sha256 = (file: string) => createHash("sha256").update(fs.readFileSync(file)).digest("hex")

const write = (root: string, rel: string, data: string | Buffer) => {
  const abs = path.join(root, rel)
  fs.mkdirSync(path.dirname(abs), { recursive: true })
  fs.writeFileSync(abs, data)
}

const teardown = async (world: World) => {
  for (const c of world.clients) await c.stop()
  for (const p of world.proxies) await p.close()
  for (const h of world.hosts) {
    for (const pid of daemonsOf(h)) {
      try {
        process.kill(pid, "SIGKILL")
      } catch {
        // gone
      }
    }
    await h.stop()
  }
}

beforeAll(() => ensureBundle(), 120_000)
afterAll(async () => {
  for (const w of worlds) await teardown(w)
  // Only once every world is down: their daemons ran in the hosts' homes there.
  for (const w of worlds) fs.rmSync(w.base, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 })
}, 60_000)

// ---- scenarios ----------------------------------------------------------------------------------

describe("a project with two ssh destinations on hosts with nothing installed", () => {
  let world: World
  let project: string
  let client: Running
  const remote = (i: number) => path.join(world.hosts[i]!.home, "mirror")

  beforeAll(async () => {
    world = await newWorld("two-hosts", 2)
    project = newProject(world, "webapp", [
      { name: "a", host: world.hosts[0]!, dir: "mirror" },
      { name: "b", host: world.hosts[1]!, dir: "mirror" },
      // A second root on host 1: same SSH connection, same daemon.
      { name: "a2", host: world.hosts[0]!, dir: "mirror2" }
    ])
  }, 30_000)

  it("uploads the agent to each host once, starts one daemon per host, and syncs", async () => {
    client = startClient(world, project)
    for (const d of ["a", "b", "a2"]) await client.waitFor(new RegExp(`\\[${d}\\] connected`), 60_000)
    expect(count(client, /installing sicksync/)).toBe(2)
    // The bundled ssh2 encrypts with the native addon of the ssh2 installed beside it, where npm built
    // one (src/services/ssh/nativeCrypto.ts), and with node:crypto where it did not.
    const addon = path.join(repoRoot, "node_modules/ssh2/lib/protocol/crypto/build/Release/sshcrypto.node")
    // (/proc/<pid>/maps names files by their real path)
    const mapped = fs.readFileSync(`/proc/${client.child.pid}/maps`, "utf8")
    expect(fs.existsSync(addon) ? mapped.includes(fs.realpathSync(addon)) : mapped.includes("sshcrypto.node")).toBe(fs.existsSync(addon))
    // One SSH connection per host, shared by both destinations on host 1.
    expect(world.hosts.map(logins)).toEqual([1, 1])
    for (const host of world.hosts) {
      // The agent is our own bundle, byte for byte, and the daemon runs it.
      expect(sha256(agentOf(host))).toBe(sha256(bundle))
      expect(daemonsOf(host)).toEqual([stateOf(host).pid])
      expect(stateOf(host).version).toBe(VERSION)
    }
    write(project, "src/index.ts", "export const answer = 42\n")
    write(project, "assets/logo.bin", Buffer.from(Array.from({ length: 70_000 }, (_, i) => (i * 7) % 256)))
    await converged(project, remote(0))
    await converged(project, remote(1))
    await converged(project, path.join(world.hosts[0]!.home, "mirror2"))
    // The two hosts really are separate: each daemon has its own state and agent.
    expect(stateOf(world.hosts[0]!).pid).not.toBe(stateOf(world.hosts[1]!).pid)
  }, 90_000)

  it("a second run reuses the running daemons and the installed agents", async () => {
    expect(await client.stop()).toBe(0)
    const pids = world.hosts.map((h) => stateOf(h).pid)
    const agents = world.hosts.map((h) => fs.statSync(agentOf(h)))
    client = startClient(world, project)
    await client.waitFor(/\[a\] connected/, 30_000)
    await client.waitFor(/\[b\] connected/, 30_000)
    expect(count(client, /installing sicksync|started the sicksync daemon/)).toBe(0)
    world.hosts.forEach((h, i) => {
      expect(stateOf(h).pid).toBe(pids[i])
      expect(daemonsOf(h)).toEqual([pids[i]])
      const now = fs.statSync(agentOf(h))
      expect([now.ino, now.mtimeMs]).toEqual([agents[i]!.ino, agents[i]!.mtimeMs])
    })
    write(project, "src/index.ts", "export const answer = 43\n")
    await converged(project, remote(0))
    await converged(project, remote(1))
  }, 60_000)

  it("a daemon killed mid-sync is restarted over SSH (without a new upload) and the client catches up", async () => {
    const hostA = world.hosts[0]!
    const before = stateOf(hostA).pid
    const startedBefore = count(client, /\[a2?\] .*started the sicksync daemon/)
    for (let i = 0; i < 200; i++) {
      write(project, `burst/f${i % 20}/n${i}.txt`, `content ${i}\n`.repeat(200))
      if (i === 60) process.kill(before, "SIGKILL")
      if (i % 20 === 0) await new Promise((r) => setTimeout(r, 10))
    }
    await client.waitFor(/\[a\] .*(connection lost|offline)/, 20_000)
    await waitUntil("a new daemon on host a", () => count(client, /\[a2?\] .*started the sicksync daemon/) > startedBefore, 30_000)
    await converged(project, remote(0), 60_000)
    await converged(project, remote(1), 60_000)
    expect(stateOf(hostA).pid).not.toBe(before)
    expect(daemonsOf(hostA)).toEqual([stateOf(hostA).pid])
    expect(count(client, /installing sicksync/)).toBe(0)
  }, 120_000)
})

describe("several clients at once on a fresh host", () => {
  it("race to start the daemon, end with exactly one, and all sync", async () => {
    const world = await newWorld("race", 1)
    const host = world.hosts[0]!
    // Reached through a Host alias in ~/.ssh/config, with a key at a path ssh would not try by itself.
    const key = generateKey(path.join(world.home, ".ssh", "race_key"))
    host.authorize(key.publicKey)
    fs.rmSync(path.join(world.home, ".ssh", "id_ed25519"))
    fs.writeFileSync(
      path.join(world.home, ".ssh", "config"),
      `Host racebox\n  HostName 127.0.0.1\n  Port ${host.port}\n  User ${host.account.name}\n  IdentityFile ~/.ssh/race_key\n`
    )
    const projects = ["p1", "p2", "p3"].map((name) =>
      newProject(world, name, [{ name: "h", host, dir: `mirror-${name}`, alias: "racebox" }])
    )
    // Started together: each finds no daemon and no agent, so each uploads and runs start-daemon.
    const clients = projects.map((p) => startClient(world, p))
    for (const c of clients) await c.waitFor(/\[h\] connected/, 60_000)
    expect(daemonsOf(host)).toEqual([stateOf(host).pid])
    expect(clients.reduce((n, c) => n + count(c, /started the sicksync daemon/), 0)).toBeLessThanOrEqual(1)
    expect(sha256(agentOf(host))).toBe(sha256(bundle))
    // No temp upload is left behind.
    expect(fs.readdirSync(path.dirname(agentOf(host)))).toEqual(["sicksync.mjs"])
    projects.forEach((p, i) => write(p, `notes/${i}.md`, `# client ${i}\n`))
    await Promise.all(projects.map((p, i) => converged(p, path.join(host.home, `mirror-p${i + 1}`))))
    // Still one daemon serving all three.
    expect(daemonsOf(host)).toHaveLength(1)
  }, 120_000)
})

describe("a link cut and restored", () => {
  let world: World
  let proxy: Proxy
  let project: string
  let client: Running
  const remote = () => path.join(world.hosts[0]!.home, "mirror")

  beforeAll(async () => {
    world = await newWorld("proxy", 1)
    const host = world.hosts[0]!
    proxy = await startProxy({ host: "127.0.0.1", port: host.port })
    world.proxies.push(proxy)
    // The client knows the host by the proxy's address.
    fs.appendFileSync(path.join(world.home, ".ssh", "known_hosts"), `${host.knownHostsLine({ port: proxy.port })}\n`)
    project = newProject(world, "site", [{ name: "h", host, dir: "mirror", port: proxy.port }])
    client = startClient(world, project)
    await client.waitFor(/\[h\] connected/, 60_000)
  }, 90_000)

  it("blackhole: the client notices, edits made while offline arrive once the link is back", async () => {
    write(project, "before.txt", "before")
    await converged(project, remote())
    const connected = count(client, /\[h\] connected/)
    const loginsBefore = logins(world.hosts[0]!)
    proxy.setMode("blackhole")
    write(project, "offline/new.txt", "made while offline")
    write(project, "before.txt", "edited while offline")
    await client.waitFor(/\[h\] .*connection lost/, 20_000)
    write(project, "offline/later.txt", "also offline")
    fs.rmSync(path.join(project, "offline", "new.txt"))
    proxy.setMode("pass")
    await waitUntil("a reconnection", () => count(client, /\[h\] connected/) > connected, 60_000)
    await converged(project, remote(), 60_000)
    expect(fs.readFileSync(path.join(remote(), "before.txt"), "utf8")).toBe("edited while offline")
    expect(fs.existsSync(path.join(remote(), "offline", "new.txt"))).toBe(false)
    // The stalled SSH connection was given up and a new one made.
    expect(logins(world.hosts[0]!)).toBeGreaterThan(loginsBefore)
  }, 120_000)

  it("reset: connections torn down, then back; edits made meanwhile arrive", async () => {
    const connected = count(client, /\[h\] connected/)
    const loginsBefore = logins(world.hosts[0]!)
    proxy.setMode("reset")
    await client.waitFor(/\[h\] .*connection lost/, 20_000)
    write(project, "after-reset/a.txt", "a")
    write(project, "before.txt", "edited after the reset")
    await new Promise((r) => setTimeout(r, 1_000))
    proxy.setMode("pass")
    await waitUntil("a reconnection", () => count(client, /\[h\] connected/) > connected, 60_000)
    await converged(project, remote(), 60_000)
    expect(logins(world.hosts[0]!)).toBeGreaterThan(loginsBefore)
    // The daemon itself was never affected: still exactly one.
    expect(daemonsOf(world.hosts[0]!)).toHaveLength(1)
  }, 120_000)
})

describe("trust and authentication", () => {
  let world: World
  let host: Sshd

  beforeAll(async () => {
    world = await newWorld("refusals", 1)
    host = world.hosts[0]!
  }, 30_000)

  const once = (project: string) => run(["once"], { cwd: project, home: world.home, env })

  const knownHosts = (lines: ReadonlyArray<string>) =>
    fs.writeFileSync(path.join(world.home, ".ssh", "known_hosts"), lines.map((l) => `${l}\n`).join(""))

  const hostFingerprint = () => spawnSync("ssh-keygen", ["-lf", `${host.hostKey.privatePath}.pub`], { encoding: "utf8" }).stdout.split(" ")[1]!

  afterEach(() => knownHosts([host.knownHostsLine()]))

  it("refuses a changed host key, showing the fingerprint and how to trust it", () => {
    const impostor = generateKey(path.join(world.base, "impostor_key"))
    knownHosts([`[127.0.0.1]:${host.port} ${impostor.publicKey.split(" ").slice(0, 2).join(" ")}`])
    const project = newProject(world, "changed-key", [{ name: "h", host, dir: "m1" }])
    const r = once(project)
    expect(r.code).not.toBe(0)
    expect(r.stderr).toContain("HAS CHANGED")
    expect(r.stderr).toContain(hostFingerprint())
    expect(r.stderr).toContain(`ssh-keygen -R '[127.0.0.1]:${host.port}'`)
    expect(r.stderr).toContain(`ssh-keyscan -p ${host.port} 127.0.0.1 >> ~/.ssh/known_hosts`)
    // Nothing was run on the host.
    expect(fs.existsSync(path.join(host.home, ".sicksync"))).toBe(false)
  }, 60_000)

  it("refuses an unknown host key, showing the fingerprint and how to trust it", () => {
    knownHosts([])
    const project = newProject(world, "unknown-key", [{ name: "h", host, dir: "m2" }])
    const r = once(project)
    expect(r.code).not.toBe(0)
    expect(r.stderr).toContain(`host key of [127.0.0.1]:${host.port} is not known`)
    expect(r.stderr).toContain(hostFingerprint())
    expect(r.stderr).toContain(`ssh-keyscan -p ${host.port} 127.0.0.1 >> ~/.ssh/known_hosts`)
  }, 60_000)

  it("says clearly when the host refuses our key", () => {
    // A fresh key that the host has never seen.
    generateKey(path.join(world.home, ".ssh", "id_ed25519"))
    const project = newProject(world, "wrong-key", [{ name: "h", host, dir: "m3" }])
    const r = once(project)
    expect(r.code).not.toBe(0)
    expect(r.stderr).toContain(`${host.account.name}@127.0.0.1:${host.port} refused our keys: tried ~/.ssh/id_ed25519`)
    expect(r.stderr).toContain("authorized_keys")
  }, 60_000)

  it("authenticates with ssh-agent, and `sicksync once` exits when done", async () => {
    const key = generateKey(path.join(world.base, "agent_key"))
    host.authorize(key.publicKey)
    const socket = path.join(world.base, "agent.sock")
    const agent = spawn("ssh-agent", ["-D", "-a", socket], { stdio: "ignore" })
    try {
      await waitUntil("the agent socket", () => fs.existsSync(socket), 5_000)
      expect(spawnSync("ssh-add", ["-q", key.privatePath], { env: { ...process.env, SSH_AUTH_SOCK: socket } }).status).toBe(0)
      fs.rmSync(path.join(world.home, ".ssh", "id_ed25519"), { force: true }) // only the agent can log in
      const project = newProject(world, "with-agent", [{ name: "h", host, dir: "m5" }])
      write(project, "hello.txt", "via the agent")
      const r = run(["once"], { cwd: project, home: world.home, env: { SSH_AUTH_SOCK: socket } })
      expect(r.stderr).toBe("")
      expect(r.code).toBe(0)
      expect(fs.readFileSync(path.join(host.home, "m5", "hello.txt"), "utf8")).toBe("via the agent")
    } finally {
      agent.kill()
    }
  }, 60_000)

  it("says clearly when the host has no usable Node.js", async () => {
    const empty = path.join(world.base, "empty-bin")
    fs.mkdirSync(empty)
    const bare = await startSshd({ dir: path.join(world.base, "bare"), path: empty })
    world.hosts.push(bare)
    const key = generateKey(path.join(world.home, ".ssh", "id_ed25519"))
    bare.authorize(key.publicKey)
    knownHosts([bare.knownHostsLine()])
    const project = newProject(world, "no-node", [{ name: "h", host: bare, dir: "m4" }])
    const r = once(project)
    expect(r.code).not.toBe(0)
    expect(r.stderr).toContain(`127.0.0.1:${bare.port} has no usable Node.js: no node or nodejs on PATH (${empty})`)
    expect(r.stderr).toContain("Install Node.js 20 or newer")
  }, 60_000)
})

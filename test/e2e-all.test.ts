/**
 * End to end for `sicksync --all` (issue #6): three projects × two destinations, on two real sshd
 * instances on 127.0.0.1 (the second reached through the loopback TCP proxy), all registered in
 * the client's ~/.sicksync-config.json and run by ONE `sicksync --all` process.
 *
 * The scenarios run in order against the same process: live edits everywhere; one host blackholed
 * while the other keeps syncing, then restored and caught up; a project's config broken at run
 * time; a project's root removed (and brought back); SIGTERM. No timed speed assertions: every wait
 * has a generous timeout.
 *
 * `.sicksync-config.json` is left out of tree comparisons (see e2e-ssh.test.ts).
 */
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { ensureBundle, type Running, start, waitUntil } from "./support/cli.js"
import { startProxy, type Proxy } from "./support/proxy.js"
import { daemonsOf, prepareClientHome, type Sshd, startSshd } from "./support/sshd.js"
import { diffTrees, waitForIdentical } from "./support/tree.js"

const skip = (rel: string) => rel === ".sicksync-config.json"
const converged = (source: string, destination: string, timeoutMs = 60_000) =>
  waitForIdentical(source, destination, { skip, mtime: true, timeoutMs })

// An agent from the developer's shell must not stand in for the key the test prepared.
const env = { SSH_AUTH_SOCK: "" }

const NAMES = ["alpha", "beta", "gamma"] as const
type Name = (typeof NAMES)[number]
/** Destination `a` is host 1 (direct), `b` is host 2 (through the proxy). */
const DESTS = ["a", "b"] as const
type Dest = (typeof DESTS)[number]

const write = (root: string, rel: string, data: string | Buffer) => {
  const abs = path.join(root, rel)
  fs.mkdirSync(path.dirname(abs), { recursive: true })
  fs.writeFileSync(abs, data)
}



/**
 * Live processes (not zombies) that belong to this test's client side: run with its $HOME in their
 * environment, or with its home or a project path on their command line or as their cwd. The remote
 * daemons run with the hosts' own $HOME and are not matched.
 */
const clientSideProcesses = (home: string, projects: ReadonlyArray<string>): Array<string> => {
  const mine = (s: string) => s === home || s.startsWith(home + path.sep) || projects.some((p) => s === p || s.startsWith(p + path.sep))
  return fs.readdirSync("/proc").flatMap((entry) => {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) return []
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, "utf8")
      if (/\) Z /.test(stat)) return [] // a zombie is already gone, waiting to be reaped
      const argv = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0").filter((a) => a !== "")
      const environ = fs.readFileSync(`/proc/${entry}/environ`, "utf8").split("\0")
      let cwd = ""
      try {
        cwd = fs.readlinkSync(`/proc/${entry}/cwd`)
      } catch {
        // not ours to read, or gone
      }
      return environ.includes(`HOME=${home}`) || argv.some(mine) || mine(cwd) ? [`${entry}: ${argv.join(" ")}`] : []
    } catch {
      return [] // gone meanwhile
    }
  })
}

describe("sicksync --all: three projects × two hosts in one process", () => {
  let base: string
  let home: string
  const hosts: Array<Sshd> = []
  let proxy: Proxy | undefined
  let client: Running | undefined
  const projects = {} as Record<Name, string>
  const remote = (name: Name, dest: Dest) => path.join(hosts[dest === "a" ? 0 : 1]!.home, `mirror-${name}`)

  const lines = (pattern: RegExp) => client!.lines.filter((l) => pattern.test(l))
  const count = (pattern: RegExp) => lines(pattern).length
  const tag = (name: Name, dest?: Dest) => `^\\[${name}\\] ${dest !== undefined ? `\\[${dest}\\] ` : ""}`
  const connectedCount = (name: Name, dest: Dest) => count(new RegExp(`${tag(name, dest)}connected to `))
  const everyDestination = async (f: (name: Name, dest: Dest) => Promise<void>, names: ReadonlyArray<Name> = NAMES) => {
    await Promise.all(names.flatMap((name) => DESTS.map((dest) => f(name, dest))))
  }
  const configFile = (name: Name) => path.join(projects[name], ".sicksync-config.json")
  const configOf = (name: Name) =>
    JSON.stringify({
      project: name,
      destinations: DESTS.map((dest) => {
        const host = hosts[dest === "a" ? 0 : 1]!
        return {
          name: dest,
          hostname: "127.0.0.1",
          port: dest === "a" ? host.port : proxy!.port,
          username: host.account.name,
          destinationLocation: `~/mirror-${name}`,
          websocketPort: 0
        }
      })
    })

  beforeAll(async () => {
    ensureBundle()
    base = fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-all-"))
    for (const i of [1, 2]) hosts.push(await startSshd({ dir: path.join(base, `host${i}`) }))
    proxy = await startProxy({ host: "127.0.0.1", port: hosts[1]!.port })
    home = path.join(base, "client")
    // Host 2 is known by the proxy's address: the client never talks to it directly.
    const key = prepareClientHome(home, [hosts[0]!.knownHostsLine(), hosts[1]!.knownHostsLine({ port: proxy.port })])
    for (const h of hosts) h.authorize(key.publicKey)
    for (const name of NAMES) {
      projects[name] = path.join(base, "code", name)
      fs.mkdirSync(projects[name], { recursive: true })
      fs.writeFileSync(configFile(name), configOf(name))
      write(projects[name], "README.md", `# ${name}\n`) // there before the start: the first big sync sends it
    }
    fs.writeFileSync(
      path.join(home, ".sicksync-config.json"),
      JSON.stringify({ projects: NAMES.map((name) => ({ path: projects[name], alias: name, active: true })) }, null, 2)
    )
  }, 120_000)

  afterAll(async () => {
    // SICKSYNC_E2E_LOG=file keeps the client's output for a look afterwards.
    if (process.env.SICKSYNC_E2E_LOG) fs.writeFileSync(process.env.SICKSYNC_E2E_LOG, client?.lines.join("\n") ?? "")
    await client?.stop("SIGKILL")
    await proxy?.close()
    for (const h of hosts) {
      for (const pid of daemonsOf(h)) {
        try {
          process.kill(pid, "SIGKILL")
        } catch {
          // gone
        }
      }
      await h.stop()
    }
    if (base !== undefined) fs.rmSync(base, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 })
  }, 60_000)

  it("starts every project of the registry, one SSH login, one daemon and one daemon session per host, and syncs edits everywhere", async () => {
    // From a directory that is no project: --all reads the registry.
    client = start(["--all"], { cwd: base, home, env })
    await client.waitFor(/syncing 3 projects/, 30_000)
    await everyDestination((name, dest) => client!.waitFor(new RegExp(`${tag(name, dest)}connected to `), 90_000).then(() => undefined))
    // Every destination of every project shares its host's one SSH connection and one daemon.
    expect(hosts.map((h) => h.log().split("\n").filter((l) => l.includes("Accepted publickey")).length)).toEqual([1, 1])
    for (const h of hosts) expect(daemonsOf(h)).toHaveLength(1)
    // ... and one daemon session, on which each project has its channel (its destination root).
    const daemonLog = (h: Sshd) => fs.readFileSync(path.join(h.home, ".sicksync", "logs", "daemon.log"), "utf8").split("\n")
    for (const h of hosts) {
      expect(daemonLog(h).filter((l) => /session \w+: opened \(client/.test(l))).toHaveLength(1)
      expect(daemonLog(h).filter((l) => /session \w+\/\d+: opened \(project/.test(l))).toHaveLength(3)
    }

    for (const name of NAMES) {
      write(projects[name], "src/index.ts", `export const project = "${name}"\n`)
      write(projects[name], "assets/data.bin", Buffer.from(Array.from({ length: 40_000 }, (_, i) => (i * 31 + name.length) % 256)))
      write(projects[name], "README.md", `# ${name}, edited\n`)
    }
    await everyDestination((name, dest) => converged(projects[name], remote(name, dest)))
  }, 180_000)

  it("a blackholed host does not hold back the other; once restored it catches up with nothing lost", async () => {
    const before = Object.fromEntries(NAMES.map((name) => [name, connectedCount(name, "b")])) as Record<Name, number>
    proxy!.setMode("blackhole")
    for (const name of NAMES) {
      write(projects[name], "during/first.txt", `${name}: written while host 2 is blackholed`)
      write(projects[name], "src/index.ts", `export const project = "${name}" // edited while blackholed\n`)
    }
    // Host 1 gets them while host 2 cannot.
    await Promise.all(NAMES.map((name) => converged(projects[name], remote(name, "a"))))
    for (const name of NAMES) expect(fs.existsSync(path.join(remote(name, "b"), "during", "first.txt"))).toBe(false)

    // The stalled link is noticed (heartbeats); edits made after that still reach host 1 at once.
    await Promise.all(NAMES.map((name) => client!.waitFor(new RegExp(`${tag(name, "b")}.*connection lost`), 30_000)))
    for (const name of NAMES) {
      write(projects[name], "during/second.txt", `${name}: written after the loss was noticed`)
      fs.rmSync(path.join(projects[name], "assets", "data.bin"))
      write(projects[name], "README.md", `# ${name}, edited while host 2 is offline\n`)
    }
    await Promise.all(NAMES.map((name) => converged(projects[name], remote(name, "a"))))
    for (const name of NAMES) expect(fs.existsSync(path.join(remote(name, "b"), "assets", "data.bin"))).toBe(true)

    proxy!.setMode("pass")
    await Promise.all(NAMES.map((name) => waitUntil(`[${name}] [b] reconnected`, () => connectedCount(name, "b") > before[name], 90_000)))
    await everyDestination((name, dest) => converged(projects[name], remote(name, dest)))
    for (const name of NAMES) {
      expect(fs.readFileSync(path.join(remote(name, "b"), "during", "first.txt"), "utf8")).toBe(`${name}: written while host 2 is blackholed`)
      expect(fs.existsSync(path.join(remote(name, "b"), "assets", "data.bin"))).toBe(false)
    }
    // Host 1 was never disturbed.
    for (const name of NAMES) expect(connectedCount(name, "a")).toBe(1)
  }, 240_000)

  it("a config broken at run time keeps that project on its last good config; the others carry on", async () => {
    const restartsBefore = count(/stopped: |changed: restarting/)
    const sessionsBefore = NAMES.flatMap((name) => DESTS.map((dest) => connectedCount(name, dest)))
    fs.writeFileSync(configFile("beta"), '{ "project": "beta", "destinations": [ ')
    await client!.waitFor(/^\[beta\] error: .*keeping the last good config/, 30_000)
    for (const name of NAMES) write(projects[name], "after-broken-config.txt", `${name}: after beta's config broke`)
    write(projects.beta, "src/still.ts", "// beta still syncs with its last good config\n")
    await everyDestination((name, dest) => converged(projects[name], remote(name, dest)))
    // Nothing was restarted: not beta (its config is unreadable), not the others.
    expect(count(/stopped: |changed: restarting/)).toBe(restartsBefore)
    expect(NAMES.flatMap((name) => DESTS.map((dest) => connectedCount(name, dest)))).toEqual(sessionsBefore)

    // Mended with the same settings as before: nothing to restart either.
    fs.writeFileSync(configFile("beta"), configOf("beta"))
    write(projects.beta, "src/mended.ts", "// config mended\n")
    await everyDestination((name, dest) => converged(projects[name], remote(name, dest)), ["beta"])
    expect(count(/changed: restarting/)).toBe(0)
  }, 180_000)

  it("a project whose root is removed is stopped and retried with its name in the logs; the others keep syncing", async () => {
    const saved = path.join(base, "gamma-saved")
    fs.cpSync(projects.gamma, saved, { recursive: true, preserveTimestamps: true })
    // Gone at once, as an unmounted or moved-away root is. (`rm -rf` takes its files one by one: a
    // deletion seen while the root is still there is the user's, and is mirrored.)
    fs.renameSync(projects.gamma, path.join(base, "gamma-gone"))
    await waitUntil(
      "two restarts of gamma",
      () => count(/^\[gamma\] error: stopped: .*restarting in /) >= 2,
      60_000
    ).catch((e: Error) => {
      throw new Error(`${e.message}; output:\n${client!.lines.join("\n")}`)
    })
    // The others are not touched: no restart, and they keep syncing to both hosts.
    expect(count(/^\[(alpha|beta)\] error: stopped/)).toBe(0)
    for (const name of ["alpha", "beta"] as const) write(projects[name], "while-gamma-is-gone.txt", `${name}: gamma is gone`)
    await everyDestination((name, dest) => converged(projects[name], remote(name, dest)), ["alpha", "beta"])
    // Its destinations are left as they were: a vanished root deletes nothing remotely.
    for (const dest of DESTS) expect(diffTrees(saved, remote("gamma", dest), { skip, mtime: true })).toEqual([])

    // Put back: a later restart finds it and brings both destinations up to date.
    fs.cpSync(saved, projects.gamma, { recursive: true, preserveTimestamps: true })
    write(projects.gamma, "back.txt", "gamma is back")
    await everyDestination((name, dest) => converged(projects[name], remote(name, dest), 120_000), ["gamma"])
    // Its config file is watched again: an edit now restarts it with the new settings.
    fs.writeFileSync(configFile("gamma"), JSON.stringify({ ...JSON.parse(configOf("gamma")), excludes: ["*.tmp"] }))
    await client!.waitFor(/^\[gamma\] .*changed: restarting with the new settings/, 30_000)
    write(projects.gamma, "scratch.tmp", "excluded now")
    write(projects.gamma, "kept.txt", "kept")
    const skipTmp = (rel: string) => skip(rel) || rel.endsWith(".tmp")
    for (const dest of DESTS) await waitForIdentical(projects.gamma, remote("gamma", dest), { skip: skipTmp, mtime: true, timeoutMs: 60_000 })
    for (const dest of DESTS) expect(fs.existsSync(path.join(remote("gamma", dest), "scratch.tmp"))).toBe(false)
  }, 240_000)

  it("stops cleanly on SIGTERM: exit code 0 and no client-side process left", async () => {
    const pid = client!.child.pid!
    // The check below does see the client while it runs.
    expect(clientSideProcesses(home, Object.values(projects)).map((p) => p.split(":")[0])).toContain(String(pid))
    expect(await client!.stop("SIGTERM", 20_000)).toBe(0)
    expect(fs.existsSync(`/proc/${pid}`)).toBe(false)
    expect(clientSideProcesses(home, Object.values(projects))).toEqual([])
  }, 60_000)
})

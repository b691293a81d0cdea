/**
 * A real OpenSSH `sshd` on 127.0.0.1 for end-to-end tests: free port, its own host key and config,
 * key-only authentication, no PAM. Each instance stands in for one remote host: sessions get their
 * own `$HOME` (via `SetEnv`, and SFTP starts there too), so two instances behave like two machines
 * with separate daemons, state files and agent uploads, while running as the same local account.
 *
 * As root, sessions run as a dedicated user `sicksync-e2e` with shell /bin/sh (created when missing;
 * root's shell startup is slow and root is refused by the config). Otherwise as the current user.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process"
import { createHmac, randomBytes } from "node:crypto"
import * as fs from "node:fs"
import * as net from "node:net"
import * as os from "node:os"
import * as path from "node:path"

export const SSHD = "/usr/sbin/sshd"
export const TEST_USER = "sicksync-e2e"

const sh = (command: string, args: ReadonlyArray<string>) => {
  const r = spawnSync(command, args, { encoding: "utf8" })
  if (r.status !== 0) throw new Error(`${command} ${args.join(" ")} failed (${r.status}): ${r.stderr}${r.error?.message ?? ""}`)
  return r.stdout
}

export interface Account {
  readonly name: string
  readonly uid: number
  readonly gid: number
}

/** The account sessions log in as: the dedicated test user when running as root, else ourselves. */
export const testAccount = (): Account => {
  if (process.getuid?.() !== 0) {
    const me = os.userInfo()
    return { name: me.username, uid: me.uid, gid: me.gid }
  }
  if (spawnSync("id", ["-u", TEST_USER]).status !== 0) {
    // --system: no aging, no mail spool; -m: sshd chdirs to the passwd home before running the session.
    sh("useradd", ["--system", "--create-home", "--home-dir", `/var/lib/${TEST_USER}`, "--shell", "/bin/sh", TEST_USER])
  }
  // useradd leaves the password "!" (locked), and without PAM sshd refuses locked accounts even for
  // key logins; "*" means "no password" without locking.
  if (!fs.readFileSync("/etc/shadow", "utf8").includes(`\n${TEST_USER}:*:`)) sh("usermod", ["-p", "*", TEST_USER])
  return {
    name: TEST_USER,
    uid: Number(sh("id", ["-u", TEST_USER]).trim()),
    gid: Number(sh("id", ["-g", TEST_USER]).trim())
  }
}

/** A port that was free a moment ago (sshd binds it right after; a clash shows as a failed start and is retried). */
export const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const server = net.createServer()
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo
      server.close(() => resolve(port))
    })
  })

export interface KeyPair {
  readonly privatePath: string
  readonly publicKey: string
}

export const generateKey = (file: string, type: "ed25519" | "ecdsa" | "rsa" = "ed25519"): KeyPair => {
  fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o700 })
  fs.rmSync(file, { force: true })
  fs.rmSync(`${file}.pub`, { force: true })
  sh("ssh-keygen", ["-q", "-t", type, "-N", "", "-C", "sicksync-test", "-f", file])
  return { privatePath: file, publicKey: fs.readFileSync(`${file}.pub`, "utf8").trim() }
}

/** The `known_hosts` host field for a host and port, plain or hashed (`|1|salt|hash`, as `ssh-keygen -H` writes). */
export const knownHostsName = (host: string, port: number, hashed = false) => {
  const name = port === 22 ? host : `[${host}]:${port}`
  if (!hashed) return name
  const salt = randomBytes(20)
  return `|1|${salt.toString("base64")}|${createHmac("sha1", salt).update(name).digest("base64")}`
}

/** `ssh-ed25519 AAAA…` without the comment. */
const keyTypeAndBlob = (publicKey: string) => publicKey.split(/\s+/).slice(0, 2).join(" ")

export interface Sshd {
  readonly host: "127.0.0.1"
  readonly port: number
  readonly account: Account
  /** This "host"'s `$HOME` for sessions. */
  readonly home: string
  readonly hostKey: KeyPair
  /** A `known_hosts` line trusting this server at `port` (default: its own). */
  readonly knownHostsLine: (options?: { port?: number; hashed?: boolean }) => string
  /** Adds a public key to the account's authorized keys on this server. */
  readonly authorize: (publicKey: string) => void
  /** Runs a shell command as the session account with this host's `$HOME` (for inspection). */
  readonly runAs: (script: string) => { code: number | null; stdout: string; stderr: string }
  readonly log: () => string
  readonly stop: () => Promise<void>
}

export interface SshdOptions {
  /** A directory for this server's files (created). */
  readonly dir: string
  /** `$PATH` of sessions; by default the directory of this node, then the usual system ones. */
  readonly path?: string
  /** More sshd_config lines (e.g. `RekeyLimit 1M`). */
  readonly config?: ReadonlyArray<string>
}

const waitForBanner = (port: number, deadline: number): Promise<void> =>
  new Promise((resolve, reject) => {
    const attempt = () => {
      const socket = net.connect({ host: "127.0.0.1", port })
      socket.setTimeout(1000)
      socket.once("data", (data) => {
        socket.destroy()
        if (data.toString("latin1").startsWith("SSH-")) resolve()
        else reject(new Error(`unexpected banner on ${port}: ${data.toString("latin1").slice(0, 80)}`))
      })
      const retry = () => {
        socket.destroy()
        if (Date.now() > deadline) reject(new Error(`sshd did not answer on 127.0.0.1:${port}`))
        else setTimeout(attempt, 50)
      }
      socket.once("error", retry)
      socket.once("timeout", retry)
    }
    attempt()
  })

export const startSshd = async (options: SshdOptions): Promise<Sshd> => {
  const account = testAccount()
  const dir = options.dir
  fs.mkdirSync(dir, { recursive: true })
  // The session account must reach authorized_keys (sshd reads it with the user's uid) and its $HOME.
  fs.chmodSync(dir, 0o755)
  for (let p = path.dirname(dir); p !== path.dirname(p); p = path.dirname(p)) {
    if (p.startsWith(os.tmpdir() + path.sep)) fs.chmodSync(p, 0o755)
  }
  if (process.getuid?.() === 0) fs.mkdirSync("/run/sshd", { recursive: true, mode: 0o755 }) // privilege separation dir
  const home = path.join(dir, "home")
  fs.mkdirSync(home, { recursive: true })
  fs.chownSync(home, account.uid, account.gid)
  fs.chmodSync(home, 0o755)
  const hostKey = generateKey(path.join(dir, "ssh_host_ed25519_key"))
  const authorizedKeys = path.join(dir, "authorized_keys")
  fs.writeFileSync(authorizedKeys, "", { mode: 0o644 })
  const logFile = path.join(dir, "sshd.log")
  const sessionPath = options.path ?? [path.dirname(process.execPath), "/usr/local/bin", "/usr/bin", "/bin"].join(":")

  let port = 0
  let child: ChildProcess | undefined
  for (let attempt = 0; attempt < 5 && child === undefined; attempt++) {
    port = await freePort()
    const config = path.join(dir, "sshd_config")
    fs.writeFileSync(
      config,
      [
        `Port ${port}`,
        "ListenAddress 127.0.0.1",
        `HostKey ${hostKey.privatePath}`,
        `PidFile ${path.join(dir, "sshd.pid")}`,
        `AuthorizedKeysFile ${authorizedKeys}`,
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin no",
        `AllowUsers ${account.name}`,
        // authorized_keys and the temp dirs are not owned by the session account
        "StrictModes no",
        "AllowTcpForwarding yes",
        "X11Forwarding no",
        "PrintMotd no",
        "MaxSessions 64",
        "MaxStartups 64",
        // sftp starts in this host's $HOME, as the shell's $HOME points there
        `Subsystem sftp internal-sftp -d ${home}`,
        `SetEnv HOME=${home} PATH=${sessionPath}`,
        "LogLevel VERBOSE",
        ...(options.config ?? []),
        ""
      ].join("\n")
    )
    const started = spawn(SSHD, ["-D", "-f", config, "-E", logFile], { stdio: "ignore" })
    const exited = new Promise<void>((resolve) => started.once("exit", () => resolve()))
    const ready = waitForBanner(port, Date.now() + 10_000)
    const outcome = await Promise.race([ready.then(() => "ready" as const), exited.then(() => "exited" as const)]).catch(
      (e: Error) => e
    )
    if (outcome === "ready") child = started
    else started.kill("SIGKILL")
    if (outcome instanceof Error && attempt === 4) throw outcome
  }
  if (child === undefined) {
    throw new Error(`sshd did not start:\n${fs.existsSync(logFile) ? fs.readFileSync(logFile, "utf8") : "(no log)"}`)
  }
  const running = child
  const exited = new Promise<void>((resolve) => running.once("exit", () => resolve()))

  return {
    host: "127.0.0.1",
    port,
    account,
    home,
    hostKey,
    knownHostsLine: (o) => `${knownHostsName("127.0.0.1", o?.port ?? port, o?.hashed)} ${keyTypeAndBlob(hostKey.publicKey)}`,
    authorize: (publicKey) => fs.appendFileSync(authorizedKeys, `${publicKey}\n`),
    runAs: (script) => {
      const r = spawnSync("/bin/sh", ["-c", script], {
        encoding: "utf8",
        env: { HOME: home, PATH: sessionPath },
        cwd: home,
        ...(process.getuid?.() === 0 ? { uid: account.uid, gid: account.gid } : {})
      })
      return { code: r.status, stdout: r.stdout, stderr: r.stderr }
    },
    log: () => (fs.existsSync(logFile) ? fs.readFileSync(logFile, "utf8") : ""),
    stop: async () => {
      if (running.exitCode !== null || running.signalCode !== null) return
      running.kill("SIGTERM")
      const timer = setTimeout(() => running.kill("SIGKILL"), 5000)
      await exited
      clearTimeout(timer)
    }
  }
}

/** Prepares a client `$HOME`: a fresh key in ~/.ssh/id_ed25519 and the given known_hosts lines. */
export const prepareClientHome = (home: string, knownHosts: ReadonlyArray<string>): KeyPair => {
  const ssh = path.join(home, ".ssh")
  fs.mkdirSync(ssh, { recursive: true, mode: 0o700 })
  const key = generateKey(path.join(ssh, "id_ed25519"))
  fs.writeFileSync(path.join(ssh, "known_hosts"), knownHosts.map((l) => `${l}\n`).join(""), { mode: 0o644 })
  return key
}

/** Daemon processes serving a host: their command line runs the agent installed under its $HOME. */
export const daemonsOf = (host: Sshd): Array<number> =>
  fs.readdirSync("/proc").flatMap((entry) => {
    if (!/^\d+$/.test(entry)) return []
    try {
      const argv = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0")
      return argv.includes("daemon") && argv.some((a) => a.startsWith(host.home + path.sep)) ? [Number(entry)] : []
    } catch {
      return []
    }
  })

/**
 * Where and how to connect for one SSH destination: our config's `username`/`port`/`identityFile`
 * (like ssh's command-line options, they win), then `~/.ssh/config` (Host sections, HostName, User,
 * Port, IdentityFile, IdentitiesOnly, IdentityAgent, UserKnownHostsFile, HostKeyAlias), then ssh's
 * defaults. Pure: the caller reads the files.
 */
import * as path from "node:path"
import SSHConfig from "ssh-config"
import type { ResolvedDestination } from "../../schemas/ConfigFile.js"

export const DEFAULT_IDENTITY_FILES: ReadonlyArray<string> = ["~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"]

export interface SshTarget {
  /** What the destination called the host (a `Host` alias or a real name). */
  readonly alias: string
  /** What is connected to. */
  readonly hostname: string
  readonly port: number
  readonly user: string
  /** Absolute paths, tried in order after the agent. */
  readonly identityFiles: ReadonlyArray<string>
  /** Identity files the user named explicitly (a missing one is worth a warning; a missing default is not). */
  readonly explicitIdentityFiles: ReadonlyArray<string>
  /** The agent socket, if one is to be used. */
  readonly agent: string | undefined
  /** Absolute paths, user files first then the system-wide one. */
  readonly knownHostsFiles: ReadonlyArray<string>
  /** The name looked up in known_hosts: `host` or `[host]:port` (or the HostKeyAlias). */
  readonly hostKeyName: string
  /** Why ~/.ssh/config cannot be honoured for this host (a ProxyJump, a bad Port), if it cannot. */
  readonly problem: string | undefined
  /** One connection per (user, host, port) in a process. */
  readonly key: string
  /** For messages: `alias (hostname:port)` or `hostname:port`. */
  readonly label: string
}

export interface TargetInputs {
  readonly home: string
  readonly localUser: string
  /** Contents of ~/.ssh/config, if there is one. */
  readonly sshConfig: string | undefined
  readonly authSock: string | undefined
}

const first = (value: string | ReadonlyArray<string> | undefined): string | undefined =>
  typeof value === "string" ? value : value?.[0]
const all = (value: string | ReadonlyArray<string> | undefined): ReadonlyArray<string> =>
  value === undefined ? [] : typeof value === "string" ? value.split(/\s+/).filter((s) => s !== "") : value

/** ssh's `~` and `%` tokens in paths (the ones that make sense here). */
const expand = (value: string, tokens: Record<string, string>, home: string) => {
  const withTokens = value.replace(/%(.)/g, (all, t: string) => (t === "%" ? "%" : (tokens[t] ?? all)))
  return withTokens === "~" ? home : withTokens.startsWith("~/") ? path.join(home, withTokens.slice(2)) : withTokens
}

export const resolveTarget = (dest: ResolvedDestination, inputs: TargetInputs): SshTarget => {
  const computed: Record<string, string | Array<string>> =
    inputs.sshConfig === undefined
      ? {}
      : SSHConfig.parse(inputs.sshConfig).compute(
          dest.username === undefined ? { Host: dest.hostname } : { Host: dest.hostname, User: dest.username },
          // Match exec would run commands from the config file; ssh would, but we need not.
          { ignoreCase: true, matchExec: false }
        )
  const get = (key: string) => computed[key]

  const alias = dest.hostname
  const hostname = (first(get("hostname")) ?? alias).replace(/%h/g, alias).replace(/%%/g, "%")
  const portText = dest.port ?? first(get("port"))
  const port = portText === undefined ? 22 : Number(portText)
  const badPort = !Number.isInteger(port) || port < 1 || port > 65535
  const user = dest.username ?? first(get("user")) ?? inputs.localUser
  const tokens = { d: inputs.home, u: inputs.localUser, r: user, h: hostname, p: String(port), n: alias }

  const configured = all(get("identityfile")).filter((f) => f.toLowerCase() !== "none")
  const explicit = [...(dest.identityFile !== undefined ? [dest.identityFile] : []), ...configured].map((f) =>
    expand(f, tokens, inputs.home)
  )
  const identityFiles = explicit.length > 0 ? explicit : DEFAULT_IDENTITY_FILES.map((f) => expand(f, tokens, inputs.home))

  const identitiesOnly = first(get("identitiesonly"))?.toLowerCase() === "yes"
  const identityAgent = first(get("identityagent"))
  const agent = identitiesOnly
    ? undefined
    : identityAgent === undefined || /^\$?\{?SSH_AUTH_SOCK\}?$/.test(identityAgent)
      ? inputs.authSock || undefined
      : identityAgent.toLowerCase() === "none"
        ? undefined
        : expand(identityAgent, tokens, inputs.home)

  const userKnownHosts = all(get("userknownhostsfile"))
  const knownHostsFiles = [
    ...(userKnownHosts.length > 0 ? userKnownHosts : ["~/.ssh/known_hosts", "~/.ssh/known_hosts2"]).map((f) =>
      expand(f, tokens, inputs.home)
    ),
    "/etc/ssh/ssh_known_hosts",
    "/etc/ssh/ssh_known_hosts2"
  ]
  const hostKeyAlias = first(get("hostkeyalias"))
  const hostKeyName = hostKeyAlias ?? (port === 22 ? hostname : `[${hostname}]:${port}`)

  const proxyJump = first(get("proxyjump"))
  const proxyCommand = first(get("proxycommand"))
  const problem = badPort
    ? `Port ${String(portText)} is not a valid port`
    : proxyJump !== undefined && proxyJump.toLowerCase() !== "none"
      ? `ProxyJump ${proxyJump} is not supported yet: connect directly, or tunnel the port yourself`
      : proxyCommand !== undefined && proxyCommand.toLowerCase() !== "none"
        ? `ProxyCommand ${proxyCommand} is not supported yet: connect directly, or tunnel the port yourself`
        : undefined

  const where = port === 22 ? hostname : `${hostname}:${port}`
  return {
    alias,
    hostname,
    port,
    user,
    identityFiles,
    explicitIdentityFiles: explicit,
    agent,
    knownHostsFiles,
    hostKeyName,
    problem,
    key: `${user}@${hostname}:${port}`,
    label: alias === hostname ? where : `${alias} (${where})`
  }
}

/** `~/…` for paths under `home`, for messages. */
export const tildify = (file: string, home: string) =>
  file === home ? "~" : file.startsWith(home + path.sep) ? `~/${path.relative(home, file)}` : file

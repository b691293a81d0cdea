/**
 * OpenSSH `known_hosts` checking, as `ssh` does it with `StrictHostKeyChecking yes`: plain and
 * hashed (`|1|salt|hash`) host fields, comma-separated patterns with `*`, `?` and `!` negation,
 * `[host]:port` names for ports other than 22, `@revoked` markers. `@cert-authority` lines are
 * skipped (host certificates are not supported). Data in, verdict out: no I/O here.
 */
import { createHash, createHmac } from "node:crypto"

export interface KnownHostEntry {
  readonly file: string
  readonly line: number
  readonly marker: "revoked" | undefined
  /** The host field as written: patterns, or one hashed name. */
  readonly hosts: string
  readonly keyType: string
  /** The key blob, base64 as in the file. */
  readonly key: string
}

export const parseKnownHosts = (file: string, text: string): ReadonlyArray<KnownHostEntry> => {
  const entries: Array<KnownHostEntry> = []
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = raw.trim()
    if (line === "" || line.startsWith("#")) return
    const fields = line.split(/\s+/)
    let marker: KnownHostEntry["marker"]
    if (fields[0]!.startsWith("@")) {
      const m = fields.shift()!
      if (m !== "@revoked") return // @cert-authority and unknown markers
      marker = "revoked"
    }
    const [hosts, keyType, key] = fields
    if (hosts === undefined || keyType === undefined || key === undefined) return
    entries.push({ file, line: index + 1, marker, hosts, keyType, key })
  })
  return entries
}

/** How `known_hosts` names a host: `host`, or `[host]:port` when the port is not 22. */
export const hostKeyName = (host: string, port: number) => (port === 22 ? host : `[${host}]:${port}`)

const globToRegExp = (pattern: string) =>
  new RegExp(
    "^" +
      pattern
        .split("")
        .map((c) => (c === "*" ? ".*" : c === "?" ? "." : c.replace(/[\\^$.|+()[\]{}]/g, "\\$&")))
        .join("") +
      "$",
    "i"
  )

/** Whether a host field names `name` (already in `[host]:port` form where needed). */
export const hostFieldMatches = (hosts: string, name: string): boolean => {
  if (hosts.startsWith("|1|")) {
    const [, , salt, hash] = hosts.split("|")
    if (salt === undefined || hash === undefined) return false
    return createHmac("sha1", Buffer.from(salt, "base64")).update(name).digest("base64") === hash
  }
  let matched = false
  for (const pattern of hosts.split(",")) {
    if (pattern === "") continue
    const negated = pattern.startsWith("!")
    if (globToRegExp(negated ? pattern.slice(1) : pattern).test(name)) {
      if (negated) return false
      matched = true
    }
  }
  return matched
}

/** `SHA256:…` as `ssh-keygen -l` prints it. */
export const fingerprint = (keyBlob: Buffer) => `SHA256:${createHash("sha256").update(keyBlob).digest("base64").replace(/=+$/, "")}`

/** The key type named inside an SSH public key blob (`ssh-ed25519`, `ecdsa-sha2-nistp256`, …). */
export const keyTypeOf = (keyBlob: Buffer): string => {
  if (keyBlob.length < 4) return "unknown"
  const length = keyBlob.readUInt32BE(0)
  return keyBlob.subarray(4, 4 + length).toString("latin1")
}

export type HostKeyVerdict =
  | { readonly _tag: "Trusted"; readonly entry: KnownHostEntry }
  | { readonly _tag: "Unknown" }
  | { readonly _tag: "Changed"; readonly known: ReadonlyArray<KnownHostEntry> }
  | { readonly _tag: "Revoked"; readonly entry: KnownHostEntry }

export const verifyHostKey = (entries: ReadonlyArray<KnownHostEntry>, name: string, keyBlob: Buffer): HostKeyVerdict => {
  const key = keyBlob.toString("base64")
  const forHost = entries.filter((e) => hostFieldMatches(e.hosts, name))
  const revoked = forHost.find((e) => e.marker === "revoked" && e.key === key)
  if (revoked !== undefined) return { _tag: "Revoked", entry: revoked }
  const trusted = forHost.find((e) => e.marker === undefined && e.key === key)
  if (trusted !== undefined) return { _tag: "Trusted", entry: trusted }
  const known = forHost.filter((e) => e.marker === undefined)
  // Any other key on record for this name means the host's identity is in question (ssh prefers the
  // known key types during key exchange, so a host that still has its old key would have shown it).
  return known.length === 0 ? { _tag: "Unknown" } : { _tag: "Changed", known }
}

/** Key types on record for `name`, in file order: offered first during key exchange, as ssh does. */
export const knownKeyTypes = (entries: ReadonlyArray<KnownHostEntry>, name: string): ReadonlyArray<string> => [
  ...new Set(entries.filter((e) => e.marker === undefined && hostFieldMatches(e.hosts, name)).map((e) => e.keyType))
]

/** Host key algorithms to offer, those matching `preferredTypes` first (an RSA key is used by the rsa-sha2 algorithms). */
export const hostKeyAlgorithms = (preferredTypes: ReadonlyArray<string>): Array<string> => {
  const all = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa"
  ]
  const forType = (type: string) => (type === "ssh-rsa" ? ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] : [type])
  const first = preferredTypes.flatMap(forType).filter((a) => all.includes(a))
  return [...new Set([...first, ...all])]
}

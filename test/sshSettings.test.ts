/**
 * The pure parts of the SSH transport: known_hosts verdicts and ~/.ssh/config resolution.
 * (Connecting, installing and tunnelling are covered end to end in e2e-ssh.test.ts.)
 */
import { createHmac, randomBytes } from "node:crypto"
import { describe, expect, it } from "vitest"
import type { ResolvedDestination } from "../src/schemas/ConfigFile.js"
import {
  fingerprint,
  hostKeyAlgorithms,
  hostKeyName,
  knownKeyTypes,
  parseKnownHosts,
  verifyHostKey
} from "../src/services/ssh/KnownHosts.js"
import { resolveTarget } from "../src/services/ssh/SshTarget.js"

/** An SSH public key blob of the given type with random key material. */
const blob = (type: string) => {
  const name = Buffer.from(type)
  const length = Buffer.alloc(4)
  length.writeUInt32BE(name.length)
  return Buffer.concat([length, name, randomBytes(36)])
}
const line = (hosts: string, key: Buffer) => `${hosts} ${key.subarray(4, 4 + key.readUInt32BE(0)).toString()} ${key.toString("base64")}`
const hashed = (name: string) => {
  const salt = randomBytes(20)
  return `|1|${salt.toString("base64")}|${createHmac("sha1", salt).update(name).digest("base64")}`
}

describe("known_hosts", () => {
  const ed = blob("ssh-ed25519")
  const rsa = blob("ssh-rsa")
  const other = blob("ssh-ed25519")

  it("trusts plain, pattern and hashed entries; [host]:port for ports other than 22", () => {
    const entries = parseKnownHosts(
      "kh",
      [
        "# comment",
        line("dev.example.com,10.0.0.5", ed),
        line("*.corp.example.com,!bad.corp.example.com", rsa),
        line(hashed("[box]:2222"), other),
        ""
      ].join("\n")
    )
    expect(verifyHostKey(entries, hostKeyName("10.0.0.5", 22), ed)._tag).toBe("Trusted")
    expect(verifyHostKey(entries, hostKeyName("a.corp.example.com", 22), rsa)._tag).toBe("Trusted")
    expect(verifyHostKey(entries, hostKeyName("bad.corp.example.com", 22), rsa)._tag).toBe("Unknown")
    expect(verifyHostKey(entries, hostKeyName("box", 2222), other)._tag).toBe("Trusted")
    // The same host on port 22 is another entry altogether.
    expect(verifyHostKey(entries, hostKeyName("box", 22), other)._tag).toBe("Unknown")
  })

  it("calls a different key for a known host a change, and honours @revoked", () => {
    const entries = parseKnownHosts("kh", [line("dev", ed), `@revoked * ${other.subarray(4, 15).toString()} ${other.toString("base64")}`].join("\n"))
    const changed = verifyHostKey(entries, "dev", rsa)
    expect(changed._tag).toBe("Changed")
    expect(changed._tag === "Changed" && changed.known.map((e) => e.line)).toEqual([1])
    expect(verifyHostKey(entries, "dev", other)._tag).toBe("Revoked")
  })

  it("prints fingerprints as ssh-keygen does and offers known key types first", () => {
    expect(fingerprint(ed)).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/)
    const entries = parseKnownHosts("kh", line("dev", rsa))
    expect(knownKeyTypes(entries, "dev")).toEqual(["ssh-rsa"])
    expect(hostKeyAlgorithms(["ssh-rsa"]).slice(0, 4)).toEqual(["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa", "ssh-ed25519"])
    expect(hostKeyAlgorithms([])[0]).toBe("ssh-ed25519")
  })
})

describe("~/.ssh/config resolution", () => {
  const dest = (over: Partial<ResolvedDestination> = {}): ResolvedDestination => ({
    name: "d",
    hostname: "dev",
    destinationLocation: "~/code",
    username: undefined,
    port: undefined,
    identityFile: undefined,
    websocketPort: 8675,
    transport: "ssh",
    ...over
  })
  const inputs = (sshConfig?: string) => ({ home: "/home/me", localUser: "me", sshConfig, authSock: "/tmp/agent.sock" })
  const config = [
    "Host dev",
    "  HostName %h.example.com",
    "  User bob",
    "  Port 2222",
    "  IdentityFile ~/.ssh/dev_key",
    "Host jump",
    "  ProxyJump bastion",
    "Host *",
    "  IdentityFile ~/.ssh/id_%r",
    ""
  ].join("\n")

  it("takes HostName, User, Port and IdentityFile from the Host section", () => {
    const t = resolveTarget(dest(), inputs(config))
    expect(t).toMatchObject({
      hostname: "dev.example.com",
      user: "bob",
      port: 2222,
      identityFiles: ["/home/me/.ssh/dev_key", "/home/me/.ssh/id_bob"],
      agent: "/tmp/agent.sock",
      hostKeyName: "[dev.example.com]:2222",
      key: "bob@dev.example.com:2222",
      label: "dev (dev.example.com:2222)",
      problem: undefined
    })
  })

  it("lets our config's username, port and identityFile win, as ssh's command line does", () => {
    const t = resolveTarget(dest({ username: "alice", port: 22, identityFile: "~/keys/mine" }), inputs(config))
    expect(t.user).toBe("alice")
    expect(t.port).toBe(22)
    expect(t.hostKeyName).toBe("dev.example.com")
    expect(t.identityFiles[0]).toBe("/home/me/keys/mine")
    expect(t.identityFiles[2]).toBe("/home/me/.ssh/id_alice")
  })

  it("falls back to ssh's defaults without a config file", () => {
    const t = resolveTarget(dest({ hostname: "10.1.2.3" }), { ...inputs(undefined), authSock: undefined })
    expect(t).toMatchObject({
      hostname: "10.1.2.3",
      user: "me",
      port: 22,
      agent: undefined,
      identityFiles: ["/home/me/.ssh/id_ed25519", "/home/me/.ssh/id_ecdsa", "/home/me/.ssh/id_rsa"],
      knownHostsFiles: ["/home/me/.ssh/known_hosts", "/home/me/.ssh/known_hosts2", "/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    })
  })

  it("skips the agent with IdentitiesOnly, and names what it cannot honour", () => {
    expect(resolveTarget(dest(), inputs("Host dev\n  IdentitiesOnly yes\n")).agent).toBeUndefined()
    expect(resolveTarget(dest({ hostname: "jump" }), inputs(config)).problem).toMatch(/ProxyJump bastion is not supported/)
    expect(resolveTarget(dest(), inputs("Host dev\n  Port 99999\n")).problem).toMatch(/not a valid port/)
  })
})

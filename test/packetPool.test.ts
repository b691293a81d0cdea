/**
 * ssh2's packets from a pool (src/services/ssh/packetPool.ts): the layout agrees with ssh2's own,
 * other ciphers are left alone, and over a real sshd every byte arrives although each write is held
 * (and its buffer owed) for a while.
 */
import { createHash, randomBytes } from "node:crypto"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { Duplex } from "node:stream"
import { Client } from "ssh2"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { type BufferPool } from "../src/services/bufferPool.js"
import { gcmLayout, makePacketBuffers, reusePacketBuffers } from "../src/services/ssh/packetPool.js"
import { holdingSocket } from "./support/holdingSocket.js"
import { prepareClientHome, type Sshd, startSshd } from "./support/sshd.js"

// eslint-disable-next-line @typescript-eslint/no-require-imports
const { CIPHER_INFO, createCipher, MAC_INFO } = require("ssh2/lib/protocol/crypto.js") as {
  CIPHER_INFO: Record<string, { keyLen: number; ivLen: number; authLen: number }>
  MAC_INFO: Record<string, { len: number }>
  createCipher: (config: unknown) => { allocPacket: (payloadLen: number) => Buffer }
}

const cipherOf = (name: string) => {
  const info = CIPHER_INFO[name]!
  // a cipher without its own authentication comes with a MAC
  const mac = info.authLen > 0 ? undefined : MAC_INFO["hmac-sha2-256"]!
  return createCipher({
    outbound: {
      seqno: 0,
      onWrite: () => undefined,
      cipherInfo: info,
      cipherKey: randomBytes(info.keyLen),
      cipherIV: randomBytes(info.ivLen),
      macInfo: mac,
      macKey: mac === undefined ? undefined : randomBytes(mac.len)
    }
  })
}

/** A socket stand-in for `reusePacketBuffers`: records writes and never calls back. */
const fakeClient = (cipher: { allocPacket: (payloadLen: number) => Buffer }) => ({
  _protocol: { _cipher: cipher },
  _sock: new Duplex({ read() {}, write(_chunk, _encoding, _done) {} }),
  on: () => undefined
})

describe("the packet layout", () => {
  it("is ssh2's own for AES-GCM, at every payload size up to a full channel packet", () => {
    const cipher = cipherOf("aes128-gcm@openssh.com")
    for (let n = 0; n <= 32777; n += n < 300 ? 1 : 97) {
      const theirs = cipher.allocPacket(n)
      const { packetLength, padding, total } = gcmLayout(n)
      expect([theirs.byteLength, theirs.readUInt32BE(0), theirs[4]]).toEqual([total, packetLength - 4, padding])
    }
  })

  it("another cipher keeps ssh2's allocation", () => {
    for (const name of ["chacha20-poly1305@openssh.com", "aes128-ctr"]) {
      const cipher = cipherOf(name)
      const own = cipher.allocPacket
      expect(reusePacketBuffers(fakeClient(cipher), makePacketBuffers())).toBe(false)
      expect(cipher.allocPacket).toBe(own)
    }
  })
})

describe("over a real sshd", () => {
  let base: string
  let host: Sshd
  let key: string
  beforeAll(async () => {
    base = fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-packets-"))
    // A new key exchange every megabyte: the pool must follow each new cipher.
    host = await startSshd({ dir: path.join(base, "host"), config: ["RekeyLimit 1M"] })
    const pair = prepareClientHome(path.join(base, "client"), [host.knownHostsLine()])
    host.authorize(pair.publicKey)
    key = fs.readFileSync(pair.privatePath, "utf8")
  })
  afterAll(async () => {
    await host?.stop()
    fs.rmSync(base, { recursive: true, force: true })
  })

  it("every byte of 24 MB arrives, through packets that are reused, across key exchanges", async () => {
    const data = randomBytes(24 * 1024 * 1024)
    const pool = makePacketBuffers()
    let given = 0
    // A buffer given back is spoiled at once: one still being written would send the spoiled bytes.
    const spoiling: BufferPool = { ...pool, give: (b) => (given++, b.fill(0xee), pool.give(b)) }
    const givenAtHandshake: Array<number> = []
    const client = new Client()
    client.on("handshake", () => givenAtHandshake.push(given))
    const adopted = await new Promise<boolean>((resolve, reject) => {
      client.once("ready", () => resolve(reusePacketBuffers(client, spoiling)))
      client.once("error", reject)
      client.connect({
        // every write held a while: sshd drops the connection at the first packet reused too early
        sock: holdingSocket(host.port, 3) as never,
        username: host.account.name,
        privateKey: key,
        algorithms: { cipher: ["aes128-gcm@openssh.com"] },
        hostVerifier: () => true
      })
    })
    try {
      expect(adopted).toBe(true)
      const digest = await new Promise<string>((resolve, reject) => {
        client.exec("sha256sum", (error, stream) => {
          if (error) return reject(error)
          let out = ""
          stream.on("data", (d: Buffer) => (out += d.toString()))
          stream.on("close", () => resolve(out.split(" ")[0]!))
          stream.on("error", reject)
          // in pieces of many sizes, so packets of many sizes
          for (let at = 0, i = 0; at < data.byteLength; i++) {
            const size = Math.min(data.byteLength - at, [1, 500, 40_000, 70_000, 1_000_000][i % 5]!)
            stream.write(data.subarray(at, at + size))
            at += size
          }
          stream.end()
        })
      })
      expect(digest).toBe(createHash("sha256").update(data).digest("hex"))
      // key exchanges every megabyte, and packets coming back between each two of them, not just before the first
      const during = givenAtHandshake.filter((n) => n > 0)
      expect(during.length).toBeGreaterThan(5)
      const between = during.slice(1).map((n, i) => n - during[i]!)
      expect(between.filter((n) => n > 0).length).toBeGreaterThan(between.length / 2)
    } finally {
      client.end()
    }
  }, 60_000)
})

/**
 * Reuses the buffers ssh2 sends its packets in.
 *
 * ssh2 allocates a fresh buffer for every packet it sends: 6,400 of 32 KiB in an initial sync of
 * 200 MB, each written once and then left to the garbage collector (see bufferPool.ts for why that
 * costs). Here a packet's buffer is lent from a pool and returns to it once the socket has written it.
 *
 * This reaches into ssh2's internals (`_protocol._cipher.allocPacket`, `_sock`), as the channel's
 * `_writev` does (Bootstrapper): package.json pins ssh2 to the version bundled. It takes over only a
 * cipher whose packets it lays out exactly as ssh2 does (AES-GCM: checked against ssh2's own
 * allocation for a range of sizes before anything is changed); any other cipher, and a cipher that
 * lays them out differently, keeps ssh2's allocation.
 */
import { randomFillSync } from "node:crypto"
import type { Socket } from "node:net"
import { type BufferPool, makeBufferPool } from "../bufferPool.js"

/**
 * Packet buffers for SSH connections (a service shares one among all its connections): room for a
 * channel's 32 KiB of data (OpenSSH's packet size) with headers, padding and tag. OpenSSH's channel
 * window holds 2 MiB, 64 packets in flight (2.1 MiB kept at most).
 */
export const makePacketBuffers = (): BufferPool => makeBufferPool(33 * 1024, 64)

interface Cipher {
  allocPacket: (payloadLen: number) => Buffer
}

interface ClientInternals {
  readonly _protocol?: { readonly _cipher?: Cipher }
  readonly _sock?: Socket
  /** After every key exchange, the new cipher in place (a client never emits "rekey", only servers do). */
  on(event: "handshake", listener: () => void): unknown
}

/**
 * Smaller packets (window adjusts, keepalives, a turn's last short frame) keep ssh2's allocation: Node
 * cuts those from its shared 8 KiB slab, and each would hold a whole pooled buffer while queued.
 */
const SMALLEST_POOLED = 4 * 1024

/** An AES-GCM packet as ssh2 lays it out: length, padding length, payload, 4-19 bytes of padding, the 16-byte tag. */
export const gcmLayout = (payloadLen: number) => {
  let packetLength = 4 + 1 + payloadLen
  let padding = 16 - ((packetLength - 4) & 15)
  if (padding < 4) padding += 16
  packetLength += padding
  return { packetLength, padding, total: packetLength + 16 }
}

/** Payload sizes the layout is checked on: around each padding boundary, and a full channel packet. */
const CHECKED_SIZES = [1, 10, 11, 12, 13, 26, 27, 28, 29, 100, 1000, 32777]

/** Whether `allocPacket` lays packets out as `gcmLayout` says (it allocates a few to see). */
const laysOutAsGcm = (cipher: Cipher) =>
  CHECKED_SIZES.every((n) => {
    const packet = cipher.allocPacket(n)
    const { packetLength, padding, total } = gcmLayout(n)
    return packet.byteLength === total && packet.readUInt32BE(0) === packetLength - 4 && packet[4] === padding
  })

/**
 * Makes the connection's packets come from a pool, now and after each key exchange, when its cipher
 * is one it knows; returns whether the current one is. Call once the connection is ready.
 */
export const reusePacketBuffers = (client: unknown, packets: BufferPool): boolean => {
  const internals = client as ClientInternals
  const sock = internals._sock
  if (sock === undefined) return false
  /**
   * Packets lent and not yet written, by their memory: a packet may be written in parts (views of it).
   * Weak: a packet never written (allocated as its socket stopped being writable, or its cipher was
   * freed) is not kept for it.
   */
  const lent = new WeakMap<ArrayBufferLike, { readonly whole: Buffer; writes: number }>()
  const adopted = new WeakSet<Cipher>()

  const adopt = (): boolean => {
    const cipher = internals._protocol?._cipher
    if (cipher === undefined || typeof cipher.allocPacket !== "function") return false
    if (adopted.has(cipher)) return true
    if (!laysOutAsGcm(cipher)) return false
    adopted.add(cipher)
    const allocate = cipher.allocPacket.bind(cipher)
    cipher.allocPacket = (payloadLen) => {
      const { packetLength, padding, total } = gcmLayout(payloadLen)
      if (total < SMALLEST_POOLED || total > packets.size) return allocate(payloadLen)
      const whole = packets.take()
      lent.set(whole.buffer, { whole, writes: 0 })
      const packet = whole.subarray(0, total)
      packet.writeUInt32BE(packetLength - 4, 0)
      packet[4] = padding
      randomFillSync(packet, 5 + payloadLen, padding)
      return packet
    }
    return true
  }

  // ssh2 writes a packet (or views of it) within the call that encrypts it; the socket calls back
  // later, never during the write, so a packet's writes are all counted before the first is done.
  // A failed write's buffer is not given back (nothing would refer to it then either; it is the rare case).
  const write = sock.write as (...args: Array<unknown>) => boolean
  sock.write = ((chunk: unknown, ...rest: Array<unknown>) => {
    const loan = Buffer.isBuffer(chunk) ? lent.get(chunk.buffer) : undefined
    if (loan === undefined || rest.length > 0) return write.call(sock, chunk, ...rest)
    loan.writes++
    return write.call(sock, chunk, (error: Error | null | undefined) => {
      if (--loan.writes > 0) return
      lent.delete(loan.whole.buffer)
      if (error == null) packets.give(loan.whole)
    })
  }) as typeof sock.write
  internals.on("handshake", adopt)
  return adopt()
}

import { describe, expect, it } from "@effect/vitest"
import { joinSmallWrites } from "../src/services/Bootstrapper.js"

const bytes = (n: number, fill: number) => Buffer.alloc(n, fill)

describe("writes on an SSH channel", () => {
  const packet = 100

  it("joins small chunks into packet-sized writes, every byte once and in order", () => {
    const chunks = Array.from({ length: 50 }, (_, i) => bytes(7 + (i % 5), i))
    const writes = joinSmallWrites(chunks, packet)
    expect(Buffer.concat(writes).equals(Buffer.concat(chunks))).toBe(true)
    // all but the last are whole packets: none goes out half empty
    expect(writes.slice(0, -1).every((w) => w.byteLength === packet)).toBe(true)
    expect(writes.length).toBe(Math.ceil(Buffer.concat(chunks).byteLength / packet))
  })

  it("passes a large chunk on without copying it, its head topping up the small ones before it", () => {
    const header = bytes(10, 1)
    const payload = bytes(1000, 2)
    const json = bytes(30, 3)
    const writes = joinSmallWrites([header, payload, json, bytes(5, 4)], packet)
    expect(Buffer.concat(writes).equals(Buffer.concat([header, payload, json, bytes(5, 4)]))).toBe(true)
    // header + 90 bytes, the next 900 of the payload as they are, its last 10 with the rest
    expect(writes.map((w) => w.byteLength)).toEqual([packet, 900, 45])
    // the payload's middle is a view of it, not a copy
    expect(writes[1]!.buffer).toBe(payload.buffer)
    expect(writes[1]!.byteOffset).toBe(payload.byteOffset + packet - 10)
  })

  it("whole packets of a large chunk are written as they are, never an empty write", () => {
    const a = bytes(300, 1)
    const b = bytes(100, 2)
    expect(joinSmallWrites([a, b], packet)).toEqual([a, b])
    expect(joinSmallWrites([a], packet)[0]).toBe(a)
    expect(joinSmallWrites([], packet)).toEqual([])
    expect(joinSmallWrites([Buffer.alloc(0), bytes(50, 3), Buffer.alloc(0)], packet).map((w) => w.byteLength)).toEqual([50])
  })

  it("any mix of sizes: the same bytes in order, whole packets but the last", () => {
    let seed = 7
    const random = (n: number) => (seed = (seed * 48271) % 2147483647) % n
    for (let round = 0; round < 200; round++) {
      const chunks = Array.from({ length: random(12) }, (_, i) => bytes(random(4) === 0 ? random(5 * packet) : random(packet), i))
      const writes = joinSmallWrites(chunks, packet)
      expect(Buffer.concat(writes).equals(Buffer.concat(chunks))).toBe(true)
      expect(writes.every((w) => w.byteLength > 0)).toBe(true)
      expect(writes.slice(0, -1).every((w) => w.byteLength % packet === 0)).toBe(true)
    }
  })
})

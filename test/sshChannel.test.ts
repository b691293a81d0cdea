import { describe, expect, it } from "@effect/vitest"
import { joinSmallWrites } from "../src/services/Bootstrapper.js"

const bytes = (n: number, fill: number) => Buffer.alloc(n, fill)

describe("writes on an SSH channel", () => {
  const packet = 100

  it("joins small chunks into packet-sized writes, every byte once and in order", () => {
    const chunks = Array.from({ length: 50 }, (_, i) => bytes(7 + (i % 5), i))
    const writes = joinSmallWrites(chunks, packet)
    expect(Buffer.concat(writes).equals(Buffer.concat(chunks))).toBe(true)
    // all but the last are at least a packet: no packet goes out half empty
    expect(writes.slice(0, -1).every((w) => w.byteLength >= packet)).toBe(true)
    expect(writes.length).toBeLessThanOrEqual(Math.ceil(Buffer.concat(chunks).byteLength / packet))
  })

  it("passes a large chunk on without copying it, its head topping up the small ones before it", () => {
    const header = bytes(10, 1)
    const payload = bytes(1000, 2)
    const json = bytes(30, 3)
    const writes = joinSmallWrites([header, payload, json, bytes(5, 4)], packet)
    expect(Buffer.concat(writes).equals(Buffer.concat([header, payload, json, bytes(5, 4)]))).toBe(true)
    expect(writes.map((w) => w.byteLength)).toEqual([packet, 1000 - (packet - 10), 35])
    // the rest of the payload is a view of it, not a copy
    expect(writes[1]!.buffer).toBe(payload.buffer)
    expect(writes[1]!.byteOffset).toBe(payload.byteOffset + packet - 10)
  })

  it("large chunks alone, and a single chunk, are written as they are", () => {
    const a = bytes(300, 1)
    const b = bytes(100, 2)
    expect(joinSmallWrites([a, b], packet)).toEqual([a, b])
    expect(joinSmallWrites([a], packet)[0]).toBe(a)
    expect(joinSmallWrites([], packet)).toEqual([])
  })
})

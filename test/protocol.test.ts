import { Either, Schema } from "effect"
import { describe, expect, it } from "vitest"
import { DaemonMessage, decodeDaemonMessage } from "../src/schemas/Protocol.js"

const bySchema = Schema.decodeUnknownEither(Schema.parseJson(DaemonMessage))

describe("decodeDaemonMessage (hand-checked fast path)", () => {
  const accepted = [
    '{"seq":7,"_tag":"Ack"}',
    '{"_tag":"Credit","bytes":1048576}',
    '{"_tag":"Manifest","seq":3,"done":false,"entries":[{"path":"a","type":"file","size":3,"mtime":1.5,"mode":420},{"path":"l","type":"symlink","size":0,"mtime":0,"mode":0,"target":"a"}]}',
    '{"_tag":"Manifest","seq":3,"done":true,"entries":[]}',
    '{"_tag":"OpFailed","seq":1,"code":"io","message":"disk full"}'
  ]
  const rejected = [
    '{"seq":-1,"_tag":"Ack"}',
    '{"seq":1.5,"_tag":"Ack"}',
    '{"seq":"1","_tag":"Ack"}',
    '{"_tag":"Credit","bytes":-5}',
    '{"_tag":"Manifest","seq":3,"done":true,"entries":[{"path":"a","type":"socket","size":0,"mtime":0,"mode":0}]}',
    '{"_tag":"Manifest","seq":3,"done":true,"entries":[{"path":"a","type":"file","size":0,"mtime":0,"mode":70000}]}',
    '{"_tag":"Manifest","seq":3,"entries":[]}',
    "not json",
    '{"_tag":"Nope"}'
  ]

  it("accepts what the Schema accepts, with the same content", () => {
    for (const text of accepted) {
      const fast = decodeDaemonMessage(text)
      const slow = bySchema(text)
      expect(Either.isRight(fast), text).toBe(true)
      expect(Either.isRight(slow), text).toBe(true)
      expect(JSON.parse(JSON.stringify(Either.getOrThrow(fast)))).toEqual(JSON.parse(JSON.stringify(Either.getOrThrow(slow))))
    }
  })

  it("rejects what the Schema rejects", () => {
    for (const text of rejected) {
      expect(Either.isLeft(decodeDaemonMessage(text)), text).toBe(true)
      expect(Either.isLeft(bySchema(text)), text).toBe(true)
    }
  })
})

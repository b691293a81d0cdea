import { Either, Schema } from "effect"
import { describe, expect, it } from "vitest"
import {
  type ClientMessage,
  DaemonMessage,
  decodeClientMessage,
  decodeDaemonMessage,
  encodeClientMessage,
  Mkdir,
  Remove,
  Rename,
  Symlink
} from "../src/schemas/Protocol.js"
import { encodeOperation, type OperationInput } from "../src/services/RemoteConnection.js"

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

describe("encodeOperation (the client's operations without the Schema)", () => {
  it("is what encodeClientMessage makes of the same operation, and decodes to it", () => {
    const cases: Array<[OperationInput, ClientMessage]> = [
      [{ _tag: "Mkdir", path: "a/b", mode: 0o2755, mtime: 1700000000123.5 }, new Mkdir({ ch: 3, seq: 9, path: "a/b", mode: 0o2755, mtime: 1700000000123.5 })],
      [{ _tag: "Mkdir", path: "d", mode: 0o700 }, new Mkdir({ ch: 3, seq: 9, path: "d", mode: 0o700 })],
      [{ _tag: "Remove", path: "\"quoted\" ünïcode\n" }, new Remove({ ch: 3, seq: 9, path: "\"quoted\" ünïcode\n" })],
      [{ _tag: "Rename", from: "x", to: "y/z" }, new Rename({ ch: 3, seq: 9, from: "x", to: "y/z" })],
      [{ _tag: "Symlink", path: "l", target: "../t", mtime: 2 }, new Symlink({ ch: 3, seq: 9, path: "l", target: "../t", mtime: 2 })],
      [{ _tag: "Symlink", path: "l", target: "" }, new Symlink({ ch: 3, seq: 9, path: "l", target: "" })]
    ]
    for (const [op, message] of cases) {
      const fast = encodeOperation(3, 9, op)
      expect(JSON.parse(fast), fast).toEqual(JSON.parse(encodeClientMessage(message)))
      expect(Either.getOrThrow(decodeClientMessage(fast))).toEqual(message)
    }
  })
})

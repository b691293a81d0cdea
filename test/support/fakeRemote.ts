/**
 * A RemoteConnection (plus a silent Progress) for tests: records what reaches each destination.
 */
import { Deferred, Effect, Layer } from "effect"
import { scanLocal } from "../../src/programs/reconcile.js"
import type { ManifestEntry } from "../../src/schemas/Protocol.js"
import { ConnectError } from "../../src/services/DaemonLocator.js"
import { none } from "../../src/services/Excludes.js"
import * as Progress from "../../src/services/Progress.js"
import * as Status from "../../src/services/Status.js"
import { type Ack, ConnectionLost, OperationFailed, RemoteConnection, type Session } from "../../src/services/RemoteConnection.js"

/**
 * A remote that records what reaches each destination. A destination can be offline (open fails),
 * have its session killed, or be held (acks wait until released).
 */
export const fakeRemote = Effect.gen(function* () {
  const applied = new Map<string, Array<string>>()
  const offline = new Set<string>()
  const sessions = new Map<string, Deferred.Deferred<ConnectionLost>>()
  const held = new Map<string, Deferred.Deferred<void>>()
  const opens = new Map<string, number>()
  /** `dest path` → the mode of the last Write of it. */
  const modes = new Map<string, number>()
  /** What a destination lists; by default exactly the local tree at that moment (already in sync). */
  const manifests = new Map<string, ReadonlyArray<ManifestEntry>>()
  /** `dest path` → how the daemon answers the next operations on it (one answer each, then acks). */
  const refuse = new Map<string, Array<OperationFailed["code"] | { readonly code: OperationFailed["code"]; readonly message: string }>>()
  const refusal = (d: string, p: string) => {
    const answer = refuse.get(`${d} ${p}`)?.shift()
    if (answer === undefined) return undefined
    const { code, message } = typeof answer === "string" ? { code: answer, message: `refused (${answer})` } : answer
    return new OperationFailed({ dest: d, path: p, code, message })
  }
  const record = (d: string, entry: string) => applied.set(d, [...(applied.get(d) ?? []), entry])
  /** Answered when waited for (held back while the destination is held): never `done` before that. */
  const ackFor = (d: string, closed: Deferred.Deferred<ConnectionLost>, p: string): Ack => ({
    wait: Effect.gen(function* () {
      const refused = refusal(d, p)
      if (refused !== undefined) return yield* refused
      const gate = held.get(d)
      if (gate !== undefined) yield* Deferred.await(gate)
      if (yield* Deferred.isDone(closed)) return yield* Effect.flatMap(Deferred.await(closed), Effect.fail)
    }),
    done: () => false
  })

  const layer = Layer.succeed(
    RemoteConnection,
    RemoteConnection.of({
      open: (d, p) =>
        Effect.gen(function* () {
          opens.set(d.name, (opens.get(d.name) ?? 0) + 1)
          if (offline.has(d.name)) return yield* new ConnectError({ dest: d.name, message: "offline", retryable: true })
          const closed = yield* Deferred.make<ConnectionLost>()
          sessions.set(d.name, closed)
          const session: Session = {
            root: d.destinationLocation,
            send: (op) =>
              Effect.sync(() => {
                const p = op._tag === "Rename" ? op.from : op.path
                record(d.name, `${op._tag} ${p}`)
                return ackFor(d.name, closed, p)
              }),
            write: (source) =>
              Effect.gen(function* () {
                const parts: Array<Uint8Array> = []
                yield* source.read((chunk) => Effect.sync(() => void parts.push(chunk)))
                record(d.name, `Write ${source.path} ${Buffer.concat(parts).toString()}`)
                modes.set(`${d.name} ${source.path}`, source.mode)
                return ackFor(d.name, closed, source.path)
              }),
            manifest: Effect.suspend(() => {
              const given = manifests.get(d.name)
              if (given !== undefined) return Effect.succeed(given)
              return scanLocal(p, none).pipe(
                Effect.map((tree) => [...tree].map(([path, e]): ManifestEntry => ({ path, ...e }))),
                Effect.orDie
              )
            }),
            closed: Deferred.await(closed)
          }
          return session
        })
    })
  )
  return { applied, offline, sessions, held, opens, modes, manifests, refuse, layer: Layer.mergeAll(layer, Progress.layerNone, Status.layerNone) }
})

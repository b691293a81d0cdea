/**
 * A TCP proxy on 127.0.0.1 that a test switches between three states, to cut and restore a link:
 *
 * - `pass`: bytes flow both ways (connections held during a blackhole are connected upstream).
 * - `blackhole`: connections are accepted but nothing is forwarded either way and nothing is closed,
 *   like a cable pulled out: established connections stall (their bytes wait, as TCP would retransmit
 *   them), and neither end learns anything except through its own timeouts.
 * - `reset`: every connection is destroyed at once, and new ones are refused with a reset.
 */
import * as net from "node:net"

export type ProxyMode = "pass" | "blackhole" | "reset"

export interface Proxy {
  readonly port: number
  readonly mode: () => ProxyMode
  readonly setMode: (mode: ProxyMode) => void
  /** Connections accepted so far. */
  readonly accepted: () => number
  readonly close: () => Promise<void>
}

interface Pair {
  readonly client: net.Socket
  upstream: net.Socket | undefined
}

export const startProxy = (target: { host: string; port: number }, initial: ProxyMode = "pass"): Promise<Proxy> =>
  new Promise((resolve, reject) => {
    let mode = initial
    let accepted = 0
    const pairs = new Set<Pair>()

    const destroy = (pair: Pair) => {
      pairs.delete(pair)
      pair.client.resetAndDestroy()
      pair.upstream?.resetAndDestroy()
    }

    const connectUpstream = (pair: Pair) => {
      const upstream = net.connect(target)
      pair.upstream = upstream
      upstream.on("error", () => destroy(pair))
      upstream.on("close", () => destroy(pair))
      pair.client.on("close", () => destroy(pair))
      // Forward by hand (not pipe(), whose drain handling would resume a stalled socket).
      const forward = (from: net.Socket, to: net.Socket) => {
        from.on("data", (chunk) => {
          if (!to.write(chunk)) {
            from.pause()
            to.once("drain", () => {
              if (mode === "pass") from.resume()
            })
          }
        })
        from.on("end", () => to.end())
      }
      forward(pair.client, upstream)
      forward(upstream, pair.client)
      if (mode === "pass") pair.client.resume()
      else upstream.pause()
    }

    const stall = (pair: Pair) => {
      pair.client.pause()
      pair.upstream?.pause()
    }
    const flow = (pair: Pair) => {
      if (pair.upstream === undefined) return connectUpstream(pair)
      pair.client.resume()
      pair.upstream.resume()
    }

    const server = net.createServer({ pauseOnConnect: true }, (client) => {
      accepted++
      const pair: Pair = { client, upstream: undefined }
      pairs.add(pair)
      client.on("error", () => destroy(pair))
      if (mode === "reset") return destroy(pair)
      if (mode === "pass") connectUpstream(pair)
      // blackhole: hold the accepted connection, forward nothing
    })
    server.once("error", reject)
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo
      resolve({
        port,
        mode: () => mode,
        accepted: () => accepted,
        setMode: (next) => {
          mode = next
          for (const pair of [...pairs]) {
            if (next === "reset") destroy(pair)
            else if (next === "blackhole") stall(pair)
            else flow(pair)
          }
        },
        close: () =>
          new Promise<void>((done) => {
            for (const pair of [...pairs]) destroy(pair)
            server.close(() => done())
          })
      })
    })
  })

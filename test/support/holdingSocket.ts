/**
 * A TCP connection to 127.0.0.1:`port` that keeps each write for `holdMs` (as a socket full of unsent
 * data does, referring to the caller's memory as libuv does), then passes it on and only then says
 * it is written. A caller that reuses a buffer before its write's callback sends the new bytes.
 */
import * as net from "node:net"
import { Duplex } from "node:stream"

export const holdingSocket = (port: number, holdMs: number): Duplex => {
  const real = net.connect(port, "127.0.0.1")
  const held: Array<{ readonly chunks: ReadonlyArray<Buffer>; readonly done: () => void }> = []
  const release = () => {
    for (const { chunks, done } of held.splice(0)) {
      real.write(Buffer.concat(chunks))
      done()
    }
  }
  const socket = new Duplex({
    writev(chunks, done) {
      held.push({ chunks: chunks.map((c) => c.chunk as Buffer), done })
      if (held.length === 1) setTimeout(release, holdMs)
    },
    read() {},
    final(done) {
      real.end()
      done()
    },
    destroy(error, done) {
      real.destroy()
      done(error)
    }
  })
  real.on("data", (data) => socket.push(data))
  real.on("end", () => socket.push(null))
  real.on("error", (error) => socket.destroy(error))
  // what http, ws and ssh2 call on a socket
  return Object.assign(socket, { setNoDelay: () => socket, setTimeout: () => socket, setKeepAlive: () => socket, ref: () => socket, unref: () => socket })
}

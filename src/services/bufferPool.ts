/**
 * Buffers of one size, filled again once what was sent from them has been written.
 *
 * A big sync sends its bytes through buffers that live for a moment each: 256 KiB batches of file
 * contents, 32 KiB SSH packets. Fresh ones for every 200 MB sent are memory the processor's caches
 * have not seen (each is written and read several times on its way out), and V8 counts them as
 * external memory and starts a full collection for every few dozen megabytes of it. A buffer written
 * a moment ago is still warm.
 *
 * One pool serves a whole service (every link, every connection), so what it keeps is bounded per
 * process, not per destination.
 */
export interface BufferPool {
  readonly size: number
  /** A buffer of `size` bytes with memory of its own (`buffer.buffer` is nobody else's). */
  readonly take: () => Buffer
  /** Takes back a buffer from `take` that nothing reads or writes any more. */
  readonly give: (buffer: Buffer) => void
}

/** A pool of `size`-byte buffers that keeps at most `keep` idle ones. */
export const makeBufferPool = (size: number, keep: number): BufferPool => {
  const idle: Array<Buffer> = []
  // A buffer given back twice would be handed to two users at once: the second giving is ignored.
  const isIdle = new WeakSet<Buffer>()
  return {
    size,
    take: () => {
      const buffer = idle.pop()
      if (buffer === undefined) return Buffer.allocUnsafeSlow(size)
      isIdle.delete(buffer)
      return buffer
    },
    give: (buffer) => {
      if (buffer.byteLength !== size || idle.length >= keep || isIdle.has(buffer)) return
      isIdle.add(buffer)
      idle.push(buffer)
    }
  }
}

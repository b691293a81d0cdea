/**
 * Progress of a big sync: on a terminal, one bar per destination (files, bytes, rate, ETA) drawn by
 * cli-progress on stderr; elsewhere nothing (the plain "reconciling" / "in sync" log lines say it).
 */
import cliProgress from "cli-progress"
import { Context, Effect, Layer, type Scope } from "effect"

export interface Bar {
  /** One more operation done, carrying `bytes` of file content. */
  readonly advance: (bytes: number) => Effect.Effect<void>
  /** True while a bar is drawn: per-file log lines would tear it, so callers skip them. */
  readonly drawn: boolean
}

export class Progress extends Context.Tag("sicksync/Progress")<
  Progress,
  {
    /** A bar for `label`, removed when the scope closes. */
    readonly start: (label: string, totalOps: number, totalBytes: number) => Effect.Effect<Bar, never, Scope.Scope>
  }
>() {}

/** Below this, a bar would flash by: not worth drawing. */
const MIN_OPS = 200
const MIN_BYTES = 20 * 1024 * 1024

const none: Bar = { advance: () => Effect.void, drawn: false }

const size = (n: number) => (n < 1024 ** 2 ? `${(n / 1024).toFixed(0)} KiB` : `${(n / 1024 ** 2).toFixed(1)} MiB`)

/** Bars on a terminal (stderr), nothing otherwise. */
export const layer: Layer.Layer<Progress> = Layer.sync(Progress, () => {
  if (!process.stderr.isTTY) return Progress.of({ start: () => Effect.succeed(none) })
  let multibar: cliProgress.MultiBar | undefined
  let active = 0
  const start = (label: string, totalOps: number, totalBytes: number) =>
    totalOps < MIN_OPS && totalBytes < MIN_BYTES
      ? Effect.succeed(none)
      : Effect.acquireRelease(
          Effect.sync(() => {
            multibar ??= new cliProgress.MultiBar(
              {
                stream: process.stderr,
                format: "{label} [{bar}] {value}/{total} | {done} of {bytes} | {rate} | ETA {eta_formatted}",
                hideCursor: true,
                clearOnComplete: false,
                etaBuffer: 50
              },
              cliProgress.Presets.shades_classic
            )
            active++
            const started = Date.now()
            let bytes = 0
            const payload = () => {
              const seconds = Math.max(0.001, (Date.now() - started) / 1000)
              return { label, done: size(bytes), bytes: size(totalBytes), rate: `${size(bytes / seconds)}/s` }
            }
            const bar = multibar.create(totalOps, 0, payload())
            const advance = (n: number) =>
              Effect.sync(() => {
                bytes += n
                bar.increment(1, payload())
              })
            return { bar, advance }
          }),
          ({ bar }) =>
            Effect.sync(() => {
              bar.stop()
              if (--active === 0) {
                multibar?.stop()
                multibar = undefined
              }
            })
        ).pipe(Effect.map(({ advance }): Bar => ({ advance, drawn: true })))
  return Progress.of({ start })
})

/** Never draws (tests, and programs embedding sicksync). */
export const layerNone: Layer.Layer<Progress> = Layer.succeed(Progress, Progress.of({ start: () => Effect.succeed(none) }))

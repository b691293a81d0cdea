/**
 * Status: what every destination is doing, for a compact live line at the bottom of a terminal
 * (`webapp → devbox1 in sync · api → devbox2 syncing 12 · docs → box3 offline, retry in 4s`).
 * Log lines are written through it, so that the status line is cleared before a line and drawn
 * again after it instead of being torn. Off a terminal it only writes the log lines.
 */
import { Context, Effect, Layer } from "effect"

export type DestinationState =
  | { readonly _tag: "connecting" }
  | { readonly _tag: "offline"; readonly retryInMs: number }
  | { readonly _tag: "reconciling" }
  | { readonly _tag: "syncing"; readonly files: number }
  | { readonly _tag: "inSync" }
  /** The queue is drained, but these many paths failed and are not mirrored until changed again (or reconnected). */
  | { readonly _tag: "failing"; readonly failed: number }
  | { readonly _tag: "halted" }

export class Status extends Context.Tag("sicksync/Status")<
  Status,
  {
    readonly set: (project: string, dest: string, state: DestinationState) => Effect.Effect<void>
    /** The destination is no longer running (its worker ended). */
    readonly remove: (project: string, dest: string) => Effect.Effect<void>
    /** Writes one log line (without its newline) to stdout or stderr. */
    readonly line: (text: string, stream: "stdout" | "stderr") => void
  }
>() {}

export const describeState = (state: DestinationState): string => {
  switch (state._tag) {
    case "connecting":
      return "connecting"
    case "offline":
      return `offline, retry in ${Math.max(1, Math.round(state.retryInMs / 1000))}s`
    case "reconciling":
      return "comparing"
    case "syncing":
      return `syncing ${state.files}`
    case "inSync":
      return "in sync"
    case "failing":
      return `${state.failed} failed`
    case "halted":
      return "halted"
  }
}

/** The status line for these states, cut to `columns`. */
export const render = (states: ReadonlyMap<string, DestinationState>, columns: number): string => {
  const text = [...states].map(([key, state]) => `${key} ${describeState(state)}`).join(" · ")
  return text.length <= columns ? text : `${text.slice(0, Math.max(0, columns - 1))}…`
}

const plainLine = (text: string, stream: "stdout" | "stderr") => {
  ;(stream === "stdout" ? process.stdout : process.stderr).write(`${text}\n`)
}

/** A live line on stderr when both stdout and stderr are a terminal; plain log lines otherwise. */
export const layer: Layer.Layer<Status> = Layer.scoped(
  Status,
  Effect.gen(function* () {
    if (!process.stderr.isTTY || !process.stdout.isTTY) {
      return Status.of({ set: () => Effect.void, remove: () => Effect.void, line: plainLine })
    }
    const states = new Map<string, DestinationState>()
    let shown = false
    const clear = () => {
      if (shown) process.stderr.write("\r\x1b[2K")
      shown = false
    }
    const draw = () => {
      clear()
      if (states.size === 0) return
      const columns = process.stderr.columns > 0 ? process.stderr.columns : 80 // 0 on a pty nobody sized
      process.stderr.write(render(states, columns - 1))
      shown = true
    }
    yield* Effect.addFinalizer(() => Effect.sync(clear))
    return Status.of({
      set: (project, dest, state) =>
        Effect.sync(() => {
          states.set(`${project} → ${dest}`, state)
          draw()
        }),
      remove: (project, dest) =>
        Effect.sync(() => {
          states.delete(`${project} → ${dest}`)
          draw()
        }),
      line: (text, stream) => {
        clear()
        plainLine(text, stream)
        draw()
      }
    })
  })
)

/** Plain log lines, no live line (tests, embedding programs). */
export const layerNone: Layer.Layer<Status> = Layer.succeed(
  Status,
  Status.of({ set: () => Effect.void, remove: () => Effect.void, line: plainLine })
)

#!/usr/bin/env node
// sicksync in one file. scripts/build.mjs puts the program (a CommonJS bundle) in PROGRAM as a
// string and compiles it here with V8's code cache, kept in ~/.cache/sicksync: a start-up then
// skips parsing and compiling 1.4 MB of JavaScript (measured: `--version` 0.52 -> 0.37 s). Node 20
// has no compile cache for ES modules (module.enableCompileCache came in Node 22).
import { createRequire } from "node:module"
import { fileURLToPath } from "node:url"

const PROGRAM = "__SICKSYNC_PROGRAM__"
const KEY = "__SICKSYNC_KEY__"

const require = createRequire(import.meta.url)
const fs = require("node:fs")
const os = require("node:os")
const path = require("node:path")
const vm = require("node:vm")

const filename = fileURLToPath(import.meta.url)

/** `~/.cache/sicksync`, or nothing when there is no home to put it in (never a relative path). */
const cacheDirectory = () => {
  try {
    // A relative XDG_CACHE_HOME is to be ignored (XDG Base Directory spec); so is a home of "".
    const xdg = process.env.XDG_CACHE_HOME
    const base = xdg && path.isAbsolute(xdg) ? xdg : path.join(os.homedir(), ".cache")
    return path.isAbsolute(base) ? path.join(base, "sicksync") : undefined
  } catch {
    return undefined
  }
}
const cacheDir = cacheDirectory()
/**
 * The daemon, and `start-daemon` which spawns it, keep a cache of their own (they run other code than
 * a client, and share a home with one over the local transport or ssh to this machine), written as
 * soon as the top level has run: `start-daemon` writes it before it spawns the daemon, which starts
 * with it.
 */
const daemonSide = process.argv[2] === "daemon" || process.argv[2] === "start-daemon"
// V8 refuses a cache from another V8 or with other flags; the name keeps each Node's apart.
const cacheName = (suffix) =>
  cacheDir && path.join(cacheDir, `${KEY}${daemonSide ? "-daemon" : ""}-v8-${process.versions.v8}-${process.arch}${suffix}.v8`)
const cacheFile = cacheName("")
/** A client's cache written a moment into a long run: kept until a short run writes a whole one. */
const midRunFile = cacheName("-midrun")

const readCache = (file) => {
  try {
    return file && fs.readFileSync(file)
  } catch {
    return undefined
  }
}

/** A temp name, then a rename: a reader never sees half a cache. */
const writeCache = (script, file) => {
  try {
    // One level at a time, never the home itself: a missing home must not be brought back.
    for (const dir of [path.dirname(cacheDir), cacheDir]) {
      try {
        fs.mkdirSync(dir, { mode: 0o700 })
      } catch (e) {
        if (e.code !== "EEXIST") throw e
      }
    }
    // A mid-run cache is not written beside a whole one that another run has written meanwhile.
    if (file === midRunFile && fs.existsSync(cacheFile)) return
    const temp = `${file}.${process.pid}.tmp`
    // Opened before the cache is serialized: where it cannot be written, a start pays nothing for it.
    const fd = fs.openSync(temp, "w", 0o600)
    try {
      fs.writeFileSync(fd, script.createCachedData())
    } finally {
      fs.closeSync(fd)
    }
    fs.renameSync(temp, file)
    // This build's caches (a client's, its mid-run one, the daemon's) stay, but for a mid-run one now
    // that a whole one is written. Other builds' go once they have not been rewritten for a month (one
    // still in use is then written again), and temp files of writes cut short after an hour.
    const now = Date.now()
    for (const name of fs.readdirSync(cacheDir)) {
      const other = path.join(cacheDir, name)
      try {
        const stale = name.endsWith(".v8")
          ? name.startsWith(`${KEY}-`) ? other === midRunFile && file === cacheFile : now - fs.statSync(other).mtimeMs > 30 * 24 * 3600 * 1000
          : name.endsWith(".tmp") && now - fs.statSync(other).mtimeMs > 3600 * 1000
        if (stale) fs.rmSync(other, { force: true })
      } catch {
        // removed meanwhile, by another run's cleanup
      }
    }
  } catch {
    // No cache (read-only home, full disk): the next start compiles again, nothing worse.
  }
}

const whole = readCache(cacheFile)
const midRun = whole === undefined && !daemonSide ? readCache(midRunFile) : undefined
const cachedData = whole ?? midRun
// The program has no import() left (everything is bundled); vm.constants is Node 20.12+ (remotes may be older).
const script = new vm.Script(PROGRAM, { filename, cachedData })
const module = { exports: {} }
const usable = cachedData !== undefined && !script.cachedDataRejected
// A client's cache holds what a run compiled before it was written: written as soon as the top level had
// run, it lacked all a sync runs (connecting, walking, comparing), which every later run then compiled
// anew (a no-change `once` measured 25–90 ms slower; 12 alternating pairs). So it is written at the exit
// of a run shorter than CACHE_AFTER_MS, and never at the exit of a longer one: by then V8 has dropped the
// bytecode of start-up code it no longer uses, and a cache without it made every later start slower than
// no cache at all (measured: `--version` 0.37 -> 0.64 s after a cache written at the exit of a
// 20,000-file sync). A long first run (an initial sync, a live session) writes one CACHE_AFTER_MS into
// it instead; it lacks what a no-change run does at its end (no-change runs 520–620 ms with it, 420–515
// with a whole one), so the next short run, which starts from it, writes a whole one at its exit: all
// it compiled, and all it loaded from the mid-run cache. Set before the program runs: its exit comes first.
const CACHE_AFTER_MS = Number(process.env.SICKSYNC_CACHE_AFTER_MS) || 2000
if (cacheFile !== undefined && !daemonSide && !(usable && whole !== undefined)) {
  let written = false
  const write = (short) => {
    if (written) return
    written = true
    if (short) return writeCache(script, cacheFile)
    if (usable) return
    // A whole cache V8 refused goes too: a short run writes the next whole one from this mid-run one.
    if (whole !== undefined) {
      try {
        fs.rmSync(cacheFile, { force: true })
      } catch {
        return
      }
    }
    writeCache(script, midRunFile)
  }
  process.once("exit", () => write(performance.now() < CACHE_AFTER_MS))
  // Timed from the process's start, as the exit is: a run ending at any moment writes one or the other.
  if (!usable) setTimeout(() => write(false), Math.max(0, CACHE_AFTER_MS - performance.now())).unref()
}
script.runInThisContext()(module.exports, require, module, filename, path.dirname(filename), import.meta.url)
if (cacheFile !== undefined && daemonSide && !usable) writeCache(script, cacheFile)

/**
 * DestinationFs on its own, against a temporary HOME: path confinement (DESIGN §4), root resolution,
 * atomic writes with mode and mtime, and the manifest. The daemon tests cover the same rules over the wire.
 */
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Either, Exit, Scope, Stream } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { type DestinationError, isInside, make, normalizeRelPath } from "../src/services/DestinationFs.js"

/** A fresh real-path HOME with a destination root `~/dest` in it, removed afterwards. */
const setup = Effect.gen(function*() {
  const home = yield* Effect.acquireRelease(
    Effect.sync(() => fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-destfs-")))),
    (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
  )
  const outside = yield* Effect.acquireRelease(
    Effect.sync(() => fs.realpathSync(fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-destfs-outside-")))),
    (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
  )
  const api = make({ home })
  const root = yield* api.resolveRoot("~/dest")
  return { home, outside, api, root }
})

/** Writes `content` to `rel` through a WriteHandle and commits it. */
const writeFile = (api: ReturnType<typeof make>, root: string, rel: string, content: string, mode = 0o644, mtimeMs = Date.now()) =>
  Effect.scoped(
    Effect.gen(function*() {
      const handle = yield* api.openWrite(root, rel)
      yield* handle.write(Buffer.from(content))
      yield* handle.commit(mode, mtimeMs)
    })
  )

/** `api.writeFile` (a promise) as an effect; its rejections are `DestinationError`s, whose tag `failureTag` reads. */
const writeOnce = (api: ReturnType<typeof make>, ...args: Parameters<ReturnType<typeof make>["writeFile"]>) =>
  Effect.tryPromise({ try: () => api.writeFile(...args), catch: (e) => e as DestinationError })

const failureTag = <A, E extends { readonly _tag: string }>(effect: Effect.Effect<A, E, Scope.Scope>) =>
  Effect.map(Effect.either(Effect.scoped(effect)), (r) => (Either.isLeft(r) ? r.left._tag : "ok"))

describe("normalizeRelPath", () => {
  it("normalises // and . segments; the root itself is no segments", () => {
    expect(normalizeRelPath("a//b/./c")).toEqual(Either.right(["a", "b", "c"]))
    expect(normalizeRelPath("./x")).toEqual(Either.right(["x"]))
    expect(normalizeRelPath("a/")).toEqual(Either.right(["a"]))
    expect(normalizeRelPath(".")).toEqual(Either.right([]))
    expect(normalizeRelPath("...")).toEqual(Either.right(["..."]))
    expect(normalizeRelPath("..foo/bar..")).toEqual(Either.right(["..foo", "bar.."]))
  })

  it("rejects empty, absolute, .. anywhere and NUL", () => {
    expect(normalizeRelPath("")).toEqual(Either.left("empty"))
    expect(normalizeRelPath("/etc/passwd")).toEqual(Either.left("absolute"))
    expect(normalizeRelPath("..")).toEqual(Either.left("dot-dot"))
    expect(normalizeRelPath("../x")).toEqual(Either.left("dot-dot"))
    expect(normalizeRelPath("a/../b")).toEqual(Either.left("dot-dot"))
    expect(normalizeRelPath("a/..")).toEqual(Either.left("dot-dot"))
    expect(normalizeRelPath("a\0b")).toEqual(Either.left("nul"))
    // NUL wins over everything else: it would truncate the path in a syscall
    expect(normalizeRelPath("/a\0")).toEqual(Either.left("nul"))
  })

  it("isInside compares whole components", () => {
    expect(isInside("/a/b", "/a/b")).toBe(true)
    expect(isInside("/a/b/c", "/a/b")).toBe(true)
    expect(isInside("/a/bc", "/a/b")).toBe(false)
    expect(isInside("/a", "/a/b")).toBe(false)
  })
})

describe("resolveRoot", () => {
  it.scoped("accepts ~/ and absolute roots under home, creating them, and returns the real path", () =>
    Effect.gen(function*() {
      const { home, api, root } = yield* setup
      expect(root).toBe(path.join(home, "dest"))
      expect(fs.statSync(root).isDirectory()).toBe(true)
      expect(yield* api.resolveRoot(path.join(home, "a/b/"))).toBe(path.join(home, "a/b"))
      fs.symlinkSync(path.join(home, "a"), path.join(home, "link-to-a"))
      expect(yield* api.resolveRoot("~/link-to-a/b")).toBe(path.join(home, "a/b"))
    }))

  it.scoped("rejects /, home itself, its ancestors, relative roots, ~/.sicksync, NUL and non-directories", () =>
    Effect.gen(function*() {
      const { home, api } = yield* setup
      fs.symlinkSync(home, path.join(home, "self"))
      fs.writeFileSync(path.join(home, "file"), "x")
      const cases: Array<[string, string]> = [
        ["/", "filesystem-root"],
        ["/..", "filesystem-root"],
        ["~", "home"],
        ["~/", "home"],
        [home, "home"],
        [home + "/x/..", "home"],
        ["~/self", "home"], // a symlink to home is home
        ["~/..", "home-ancestor"],
        [path.dirname(home), "home-ancestor"],
        ["relative/dir", "not-absolute"],
        ["./x", "not-absolute"],
        ["~user/x", "not-absolute"],
        ["~/.sicksync", "state-dir"],
        ["~/.sicksync/logs", "state-dir"],
        ["~/a\0b", "nul"],
        ["~/file", "not-a-directory"]
      ]
      for (const [destinationRoot, reason] of cases) {
        const result = yield* Effect.either(api.resolveRoot(destinationRoot))
        expect(result, destinationRoot).toMatchObject({ _tag: "Left", left: { _tag: "RootRejected", reason } })
      }
    }))
})

describe("confinement", () => {
  it.scoped("every operation refuses paths through a symlink that leaves the root; nothing changes outside", () =>
    Effect.gen(function*() {
      const { api, outside, root } = yield* setup
      fs.mkdirSync(path.join(outside, "sub"))
      fs.writeFileSync(path.join(outside, "x"), "outside")
      fs.writeFileSync(path.join(root, "victim"), "v")
      fs.symlinkSync(outside, path.join(root, "escape"))
      for (const p of ["escape/x", "escape/sub/x", "escape/new/deeper/x"]) {
        expect(yield* failureTag(writeFile(api, root, p, "pwned")), p).toBe("ConfinementError")
        expect(yield* failureTag(api.mkdir(root, p, 0o777)), p).toBe("ConfinementError")
        expect(yield* failureTag(api.symlink(root, p, "/")), p).toBe("ConfinementError")
        expect(yield* failureTag(api.remove(root, p)), p).toBe("ConfinementError")
        expect(yield* failureTag(api.rename(root, p, "y")), p).toBe("ConfinementError")
        expect(yield* failureTag(api.rename(root, "victim", p)), p).toBe("ConfinementError")
      }
      expect(fs.readdirSync(outside).sort()).toEqual(["sub", "x"])
      expect(fs.readdirSync(path.join(outside, "sub"))).toEqual([])
      expect(fs.readFileSync(path.join(outside, "x"), "utf8")).toBe("outside")
      expect(fs.readFileSync(path.join(root, "victim"), "utf8")).toBe("v")
      // the link itself is a path inside the root: removing it removes the link, not what it points to
      yield* api.remove(root, "escape")
      expect(fs.existsSync(path.join(root, "escape"))).toBe(false)
      expect(fs.readFileSync(path.join(outside, "x"), "utf8")).toBe("outside")
    }))

  it.scoped("the root itself is never written, removed, renamed or replaced", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      fs.writeFileSync(path.join(root, "keep"), "k")
      for (const p of [".", "./", "//"]) {
        expect(yield* failureTag(writeFile(api, root, p, "x")), p).toBe("ConfinementError")
        expect(yield* failureTag(api.remove(root, p)), p).toBe("ConfinementError")
        expect(yield* failureTag(api.rename(root, p, "y")), p).toBe("ConfinementError")
        expect(yield* failureTag(api.rename(root, "keep", p)), p).toBe("ConfinementError")
        expect(yield* failureTag(api.symlink(root, p, "/")), p).toBe("ConfinementError")
      }
      // mkdir of the root is a no-op that succeeds (it exists), and leaves the content alone
      yield* api.mkdir(root, ".", 0o700)
      expect(fs.readFileSync(path.join(root, "keep"), "utf8")).toBe("k")
    }))

  it.scoped("a symlinked parent that stays inside the root is followed", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      fs.mkdirSync(path.join(root, "real"))
      fs.symlinkSync("real", path.join(root, "inside"))
      yield* writeFile(api, root, "inside/f", "ok")
      expect(fs.readFileSync(path.join(root, "real/f"), "utf8")).toBe("ok")
    }))
})

describe("writes", () => {
  it.scoped("commit applies mode and the mtime given in milliseconds, atomically", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      const mtime = Date.UTC(2020, 0, 2, 3, 4, 5, 678)
      yield* writeFile(api, root, "d/run.sh", "#!/bin/sh\n", 0o755, mtime)
      const st = fs.statSync(path.join(root, "d/run.sh"))
      expect(st.mode & 0o7777).toBe(0o755)
      expect(Math.abs(st.mtimeMs - mtime)).toBeLessThan(1)
      // the manifest reports the same unit back
      const entries = Chunk.toReadonlyArray(yield* Stream.runCollect(api.manifest(root)))
      const entry = entries.find((e) => e.path === "d/run.sh")
      expect(entry).toMatchObject({ type: "file", size: 10, mode: 0o755 })
      expect(Math.abs(entry!.mtime - mtime)).toBeLessThan(1)
    }))

  it.scoped("a write whose scope closes before commit leaves no temp file and the old content", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      yield* writeFile(api, root, "f", "old")
      const scope = yield* Scope.make()
      const handle = yield* api.openWrite(root, "f").pipe(Scope.extend(scope))
      yield* handle.write(Buffer.from("partial"))
      expect(fs.existsSync(handle.tempPath)).toBe(true)
      const entries = Chunk.toReadonlyArray(yield* Stream.runCollect(api.manifest(root)))
      expect(entries.map((e) => e.path)).toEqual(["f"]) // temp files are not part of the tree
      yield* Scope.close(scope, Exit.void)
      expect(fs.readdirSync(root)).toEqual(["f"])
      expect(fs.readFileSync(path.join(root, "f"), "utf8")).toBe("old")
    }))
})

describe("one-go writes, modes and the verified-directory cache", () => {
  const stat = (p: string) => fs.lstatSync(p)

  it.scoped("writeFile gives the exact mode (also bits the umask clears, and special bits) and mtime, leaving no temp file", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      const mtime = Date.UTC(2019, 4, 5, 6, 7, 8, 901)
      for (const [name, mode] of [["a", 0o644], ["b", 0o777], ["c", 0o600], ["d", 0o4755], ["e", 0o2770], ["f", 0o000]] as const) {
        yield* writeOnce(api, root, `m/${name}`, [Buffer.from("ab"), Buffer.alloc(0), Buffer.from("cd")], mode, mtime)
        const st = stat(path.join(root, "m", name))
        expect(st.mode & 0o7777, name).toBe(mode)
        expect(Math.abs(st.mtimeMs - mtime), name).toBeLessThan(1)
        expect(fs.readFileSync(path.join(root, "m", name), "utf8")).toBe("abcd")
      }
      expect(fs.readdirSync(path.join(root, "m")).sort()).toEqual(["a", "b", "c", "d", "e", "f"])
    }))

  it.scoped("writeFile rejects with a DestinationIoError when the filesystem refuses, and leaves nothing behind", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      const long = "x".repeat(300) // longer than a name may be (ENAMETOOLONG)
      const error = yield* Effect.flip(writeOnce(api, root, `m/${long}`, [Buffer.from("ab")], 0o644, Date.now()))
      expect(error._tag).toBe("DestinationIoError")
      expect(error.message).toContain("ENAMETOOLONG")
      expect(fs.readdirSync(path.join(root, "m"))).toEqual([])
    }))

  it.scoped("writeFile replaces a directory tree or a symlink at the target, never writing through the link", () =>
    Effect.gen(function*() {
      const { api, outside, root } = yield* setup
      fs.mkdirSync(path.join(root, "tree/sub"), { recursive: true })
      fs.writeFileSync(path.join(root, "tree/sub/x"), "x")
      fs.writeFileSync(path.join(outside, "target"), "outside")
      fs.symlinkSync(path.join(outside, "target"), path.join(root, "link"))
      yield* writeOnce(api, root, "tree", [Buffer.from("file")], 0o644, Date.now())
      yield* writeOnce(api, root, "link", [Buffer.from("file")], 0o644, Date.now())
      expect(stat(path.join(root, "tree")).isFile()).toBe(true)
      expect(stat(path.join(root, "link")).isFile()).toBe(true)
      expect(fs.readFileSync(path.join(outside, "target"), "utf8")).toBe("outside")
      expect(fs.readdirSync(root).sort()).toEqual(["link", "tree"])
    }))

  it.scoped("writeFile replaces a file in place with the new content, mode and mtime, leaving no temp file", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      yield* writeOnce(api, root, "r/f", [Buffer.from("old content")], 0o600, Date.now())
      const mtime = Date.UTC(2017, 3, 4, 5, 6, 7, 89)
      yield* writeOnce(api, root, "r/f", [Buffer.from("new")], 0o755, mtime)
      const st = stat(path.join(root, "r/f"))
      expect({ content: fs.readFileSync(path.join(root, "r/f"), "utf8"), mode: st.mode & 0o7777 }).toEqual({ content: "new", mode: 0o755 })
      expect(Math.abs(st.mtimeMs - mtime)).toBeLessThan(1)
      expect(fs.readdirSync(path.join(root, "r"))).toEqual(["f"])
    }))

  it.scoped("remove takes small and big files, a symlink (not what it points to), a tree; a missing path is fine", () =>
    Effect.gen(function*() {
      const { api, outside, root } = yield* setup
      fs.writeFileSync(path.join(root, "small"), "x")
      fs.writeFileSync(path.join(root, "big"), Buffer.alloc(3 * 1024 * 1024, 1)) // past the synchronous unlink's size
      fs.mkdirSync(path.join(outside, "dir"))
      fs.writeFileSync(path.join(outside, "dir/keep"), "keep")
      fs.symlinkSync(path.join(outside, "dir"), path.join(root, "link"))
      fs.mkdirSync(path.join(root, "tree/sub"), { recursive: true })
      fs.writeFileSync(path.join(root, "tree/sub/x"), "x")
      for (const p of ["small", "big", "link", "tree", "missing", "tree/gone/too"]) yield* api.remove(root, p)
      expect(fs.readdirSync(root)).toEqual([])
      expect(fs.readFileSync(path.join(outside, "dir/keep"), "utf8")).toBe("keep")
    }))

  it.scoped("mkdir gives the exact mode and mtime to new and existing directories", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      const mtime = Date.UTC(2018, 1, 2, 3, 4, 5, 6)
      for (const [name, mode] of [["a", 0o755], ["b", 0o777], ["c", 0o2750], ["d", 0o700]] as const) {
        yield* api.mkdir(root, `n/${name}`, mode, mtime)
        expect(stat(path.join(root, "n", name)).mode & 0o7777, name).toBe(mode)
        expect(Math.abs(stat(path.join(root, "n", name)).mtimeMs - mtime), name).toBeLessThan(1)
        // again, with another mode: changed in place
        yield* api.mkdir(root, `n/${name}`, 0o711, mtime + 1000)
        expect(stat(path.join(root, "n", name)).mode & 0o7777, name).toBe(0o711)
        expect(Math.abs(stat(path.join(root, "n", name)).mtimeMs - (mtime + 1000)), name).toBeLessThan(1)
      }
      // a file in the way becomes a directory
      fs.writeFileSync(path.join(root, "n/file"), "x")
      yield* api.mkdir(root, "n/file", 0o750)
      expect(stat(path.join(root, "n/file")).isDirectory()).toBe(true)
      expect(stat(path.join(root, "n/file")).mode & 0o7777).toBe(0o750)
    }))

  it.scoped("a verified directory replaced through the API is checked again: no write through the new symlink", () =>
    Effect.gen(function*() {
      const { api, outside, root } = yield* setup
      yield* writeOnce(api, root, "d/f", [Buffer.from("1")], 0o644, Date.now())
      yield* writeOnce(api, root, "e/f", [Buffer.from("1")], 0o644, Date.now())
      yield* writeOnce(api, root, "g/f", [Buffer.from("1")], 0o644, Date.now())
      // d is replaced by a symlink leaving the root, by this API
      yield* api.symlink(root, "d", outside)
      // e is removed by this API, then a symlink is put there by someone else
      yield* api.remove(root, "e")
      fs.symlinkSync(outside, path.join(root, "e"))
      // g is renamed away by this API, and a symlink put in its place
      yield* api.rename(root, "g", "g2")
      fs.symlinkSync(outside, path.join(root, "g"))
      for (const p of ["d/x", "e/x", "g/x", "d/new/x"]) {
        expect(yield* failureTag(writeOnce(api, root, p, [Buffer.from("pwned")], 0o644, Date.now())), p).toBe("ConfinementError")
        expect(yield* failureTag(writeFile(api, root, p, "pwned")), p).toBe("ConfinementError")
        expect(yield* failureTag(api.mkdir(root, p, 0o755)), p).toBe("ConfinementError")
      }
      expect(fs.readdirSync(outside)).toEqual([])
      expect(fs.readFileSync(path.join(root, "g2/f"), "utf8")).toBe("1")
    }))

  it.live("a verified directory swapped for a symlink by another process is checked again after a second", () =>
    Effect.scoped(Effect.gen(function*() {
      const { api, outside, root } = yield* setup
      yield* writeOnce(api, root, "x/f", [Buffer.from("1")], 0o644, Date.now())
      fs.rmSync(path.join(root, "x"), { recursive: true })
      fs.symlinkSync(outside, path.join(root, "x"))
      yield* Effect.sleep("1100 millis")
      expect(yield* failureTag(writeOnce(api, root, "x/g", [Buffer.from("pwned")], 0o644, Date.now()))).toBe("ConfinementError")
      expect(fs.readdirSync(outside)).toEqual([])
    })))
})

describe("manifest", () => {
  it.scoped("removes temp files a dead daemon left, never a live write's, nor what it did not write", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      fs.mkdirSync(path.join(root, "d"))
      // a write cut short by a daemon killed mid-write (another instance's id in the name)
      const orphan = path.join(root, "d", ".f.sicksync-0123456789abcdef.tmp")
      fs.writeFileSync(orphan, "partial")
      // something else with such a name: not a file or symlink we would have made
      const dir = path.join(root, ".g.sicksync-89abcdef01234567.tmp")
      fs.mkdirSync(dir)
      // this instance's write, still in progress
      const handle = yield* api.openWrite(root, "d/h")
      yield* handle.write(Buffer.from("half"))
      const entries = Chunk.toReadonlyArray(yield* Stream.runCollect(api.manifest(root)))
      expect(entries.map((e) => e.path).sort()).toEqual(["d"])
      expect(fs.existsSync(orphan)).toBe(false)
      expect(fs.existsSync(dir)).toBe(true)
      expect(fs.readFileSync(handle.tempPath, "utf8")).toBe("half")
      yield* handle.commit(0o644, Date.now())
      expect(fs.readFileSync(path.join(root, "d/h"), "utf8")).toBe("half")
    }))

  /** What the manifest should hold, walked synchronously. */
  const expected = (root: string) => {
    const out = new Map<string, string>()
    const walk = (rel: string) => {
      for (const name of fs.readdirSync(rel === "" ? root : path.join(root, rel))) {
        if (name.includes(".sicksync-")) continue
        const p = rel === "" ? name : `${rel}/${name}`
        const st = fs.lstatSync(path.join(root, p))
        const type = st.isDirectory() ? "dir" : st.isFile() ? "file" : "symlink"
        out.set(p, `${type} ${type === "dir" ? 0 : st.size} ${st.mtimeMs} ${st.mode & 0o7777}`)
        if (st.isDirectory()) walk(p)
      }
    }
    walk("")
    return out
  }

  it.scoped("pages list every entry once, in pages of at most the size asked for, none empty", () =>
    Effect.gen(function*() {
      const { api, root } = yield* setup
      // wide and deep: more directories than are read at once, one of them bigger than a read batch
      for (let i = 0; i < 40; i++) {
        const dir = path.join(root, `w${i}`, ...Array.from({ length: i % 7 }, (_, k) => `deep${k}`))
        fs.mkdirSync(dir, { recursive: true })
        for (let k = 0; k < (i === 3 ? 700 : 5); k++) fs.writeFileSync(path.join(dir, `f${k}`), "x".repeat(k))
      }
      fs.symlinkSync("../w1", path.join(root, "w0/link"))
      // (temp files: the test before; removing an orphan changes its directory's mtime, listed before)
      for (const pageSize of [1, 7, 1000]) {
        const pages = Chunk.toReadonlyArray(yield* Stream.runCollect(api.manifestPages(root, pageSize)))
        for (const page of pages) {
          expect(page.length).toBeGreaterThan(0)
          expect(page.length).toBeLessThanOrEqual(pageSize)
        }
        const entries = pages.flat()
        const got = new Map(entries.map((e) => [e.path, `${e.type} ${e.size} ${e.mtime} ${e.mode}`]))
        expect(got.size).toBe(entries.length)
        expect(got).toEqual(expected(root))
        expect(entries.find((e) => e.path === "w0/link")).toMatchObject({ type: "symlink", target: "../w1" })
      }
      // stopping early is fine
      const first = yield* Stream.runCollect(Stream.take(api.manifestPages(root, 10), 1))
      expect(Chunk.size(first)).toBe(1)
      // an empty root has no pages
      const empty = yield* api.resolveRoot("~/empty")
      expect(Chunk.size(yield* Stream.runCollect(api.manifestPages(empty, 10)))).toBe(0)
    }))
})

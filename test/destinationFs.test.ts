/**
 * DestinationFs on its own, against a temporary HOME: path confinement (DESIGN §4), root resolution,
 * atomic writes with mode and mtime, and the manifest. The daemon tests cover the same rules over the wire.
 */
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Either, Exit, Scope, Stream } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { isInside, make, normalizeRelPath } from "../src/services/DestinationFs.js"

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

import { describe, expect, it } from "@effect/vitest"
import { Effect, Exit } from "effect"
import * as fs from "node:fs"
import * as os from "node:os"
import * as path from "node:path"
import { DEFAULT_EXCLUDES } from "../src/schemas/ConfigFile.js"
import { ExcludesFileError, fromPatterns, makeExcludes, none } from "../src/services/Excludes.js"

const tmpRoot = Effect.acquireRelease(
  Effect.sync(() => fs.mkdtempSync(path.join(os.tmpdir(), "sicksync-excludes-"))),
  (dir) => Effect.sync(() => fs.rmSync(dir, { recursive: true, force: true }))
)

describe("fromPatterns", () => {
  it("default excludes: .git, .idea, *.swp, .svn, also nested and inside them", () => {
    const ex = fromPatterns(DEFAULT_EXCLUDES)
    expect(ex.isExcluded(".git", true)).toBe(true)
    expect(ex.isExcluded(".git/HEAD", false)).toBe(true)
    expect(ex.isExcluded(".git/objects/ab/cdef", false)).toBe(true)
    expect(ex.isExcluded("sub/.git", true)).toBe(true)
    expect(ex.isExcluded(".idea/workspace.xml", false)).toBe(true)
    expect(ex.isExcluded(".svn", true)).toBe(true)
    expect(ex.isExcluded("src/.main.ts.swp", false)).toBe(true)
    expect(ex.isExcluded("src/main.ts", false)).toBe(false)
    expect(ex.isExcluded("src", true)).toBe(false)
    expect(ex.isExcluded(".gitignore", false)).toBe(false)
    expect(ex.isExcluded(".github/workflows/ci.yml", false)).toBe(false)
  })

  it("globs: *, **, character classes, root anchoring", () => {
    const ex = fromPatterns(["*.log", "docs/**/*.tmp", "/only-at-root", "cache-[0-9]"])
    expect(ex.isExcluded("a.log", false)).toBe(true)
    expect(ex.isExcluded("deep/er/b.log", false)).toBe(true)
    expect(ex.isExcluded("a.log.txt", false)).toBe(false)
    expect(ex.isExcluded("docs/x.tmp", false)).toBe(true)
    expect(ex.isExcluded("docs/a/b/x.tmp", false)).toBe(true)
    expect(ex.isExcluded("other/x.tmp", false)).toBe(false)
    expect(ex.isExcluded("only-at-root", false)).toBe(true)
    expect(ex.isExcluded("sub/only-at-root", false)).toBe(false)
    expect(ex.isExcluded("cache-7", true)).toBe(true)
    expect(ex.isExcluded("cache-x", true)).toBe(false)
  })

  it("`dir/` matches directories only, and everything inside them", () => {
    const ex = fromPatterns(["build/", "node_modules/"])
    expect(ex.isExcluded("build", true)).toBe(true)
    expect(ex.isExcluded("build", false)).toBe(false) // a *file* named build is synced
    expect(ex.isExcluded("build/out.js", false)).toBe(true)
    expect(ex.isExcluded("build/sub", true)).toBe(true)
    expect(ex.isExcluded("pkg/node_modules", true)).toBe(true)
    expect(ex.isExcluded("pkg/node_modules/left-pad/index.js", false)).toBe(true)
    expect(ex.isExcluded("node_modules_backup/x", false)).toBe(false)
  })

  it("negation re-includes, later rules win, but not inside an excluded directory (git)", () => {
    const ex = fromPatterns(["*.log", "!keep.log", "vendor/", "!vendor/keep.js", "*.tmp", "!*.tmp", "x.tmp"])
    expect(ex.isExcluded("a.log", false)).toBe(true)
    expect(ex.isExcluded("keep.log", false)).toBe(false)
    expect(ex.isExcluded("sub/keep.log", false)).toBe(false)
    expect(ex.isExcluded("vendor/keep.js", false)).toBe(true)
    expect(ex.isExcluded("y.tmp", false)).toBe(false)
    expect(ex.isExcluded("x.tmp", false)).toBe(true)
  })

  it("comments, blank lines, multi-line strings, CRLF; the root and outside paths are never excluded", () => {
    const ex = fromPatterns(["# a comment\r\n\r\n*.o\r\n", "\\#literal"])
    expect(ex.isExcluded("main.o", false)).toBe(true)
    expect(ex.isExcluded("# a comment", false)).toBe(false)
    expect(ex.isExcluded("#literal", false)).toBe(true)
    const all = fromPatterns(["*"])
    expect(all.isExcluded("", true)).toBe(false)
    expect(all.isExcluded(".", true)).toBe(false)
    expect(all.isExcluded("../elsewhere", false)).toBe(false)
    expect(all.isExcluded("anything", false)).toBe(true)
    expect(none.isExcluded("anything", false)).toBe(false)
  })

  it("case sensitivity is an option", () => {
    expect(fromPatterns(["*.log"], { ignoreCase: false }).isExcluded("A.LOG", false)).toBe(false)
    expect(fromPatterns(["*.log"], { ignoreCase: true }).isExcluded("A.LOG", false)).toBe(true)
  })
})

describe("makeExcludes", () => {
  it.scoped("reads excludesFile relative to the root (not the cwd), after which excludes win", () =>
    Effect.gen(function*() {
      const root = yield* tmpRoot
      fs.writeFileSync(path.join(root, ".gitignore"), "dist/\n*.log\n# comment\n")
      expect(process.cwd()).not.toBe(root)
      const ex = yield* makeExcludes({ root, excludes: [".git", "!keep.log"] })
      expect(ex.isExcluded("dist", true)).toBe(true)
      expect(ex.isExcluded("dist/a.js", false)).toBe(true)
      expect(ex.isExcluded("x.log", false)).toBe(true)
      expect(ex.isExcluded("keep.log", false)).toBe(false)
      expect(ex.isExcluded(".git", true)).toBe(true)
      expect(ex.isExcluded("src/a.ts", false)).toBe(false)
    }))

  it.scoped("defaults: DEFAULT_EXCLUDES and .gitignore", () =>
    Effect.gen(function*() {
      const root = yield* tmpRoot
      fs.writeFileSync(path.join(root, ".gitignore"), "coverage/\n")
      const ex = yield* makeExcludes({ root })
      expect(ex.isExcluded(".git", true)).toBe(true)
      expect(ex.isExcluded("a.swp", false)).toBe(true)
      expect(ex.isExcluded("coverage/index.html", false)).toBe(true)
      expect(ex.isExcluded("src/a.ts", false)).toBe(false)
    }))

  it.scoped("a missing excludesFile is fine", () =>
    Effect.gen(function*() {
      const root = yield* tmpRoot
      const ex = yield* makeExcludes({ root, excludes: ["*.o"], excludesFile: [".gitignore", "no/such/file"] })
      expect(ex.isExcluded("a.o", false)).toBe(true)
      expect(ex.isExcluded("a.c", false)).toBe(false)
    }))

  it.scoped("several excludesFiles (also a single string, also absolute), in order", () =>
    Effect.gen(function*() {
      const root = yield* tmpRoot
      fs.mkdirSync(path.join(root, "config"))
      fs.writeFileSync(path.join(root, ".gitignore"), "*.gen.ts\n")
      fs.writeFileSync(path.join(root, "config", "sync-ignore"), "secrets/\n!keep.gen.ts\n")
      const ex = yield* makeExcludes({ root, excludes: [], excludesFile: [".gitignore", "config/sync-ignore"] })
      expect(ex.isExcluded("a.gen.ts", false)).toBe(true)
      expect(ex.isExcluded("keep.gen.ts", false)).toBe(false)
      expect(ex.isExcluded("secrets/key", false)).toBe(true)
      // patterns are anchored at the root, wherever their file lives
      expect(ex.isExcluded("config/secrets", true)).toBe(true)

      const single = yield* makeExcludes({ root, excludes: [], excludesFile: path.join(root, "config", "sync-ignore") })
      expect(single.isExcluded("secrets/key", false)).toBe(true)
      expect(single.isExcluded("a.gen.ts", false)).toBe(false)
    }))

  it.scoped("an unreadable excludesFile is an error naming it", () =>
    Effect.gen(function*() {
      const root = yield* tmpRoot
      fs.mkdirSync(path.join(root, ".gitignore")) // a directory: EISDIR (works as root, too)
      const exit = yield* Effect.exit(makeExcludes({ root, excludesFile: [".gitignore"] }))
      expect(Exit.isFailure(exit)).toBe(true)
      if (Exit.isFailure(exit)) {
        const error = exit.cause._tag === "Fail" ? exit.cause.error : undefined
        expect(error).toBeInstanceOf(ExcludesFileError)
        expect(error?.file).toBe(path.join(root, ".gitignore"))
        expect(error?.message).toContain(path.join(root, ".gitignore"))
      }
    }))
})

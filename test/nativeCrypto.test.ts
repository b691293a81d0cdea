/**
 * The loader that hands the bundled ssh2 the native crypto addon of the installed ssh2.
 */
import * as fs from "node:fs"
import { createRequire } from "node:module"
import * as path from "node:path"
import { describe, expect, it } from "vitest"
import { loadSsh2Addon } from "../src/services/ssh/nativeCrypto.js"
import { repoRoot } from "./support/cli.js"

const require = createRequire(import.meta.url)
const installed = (require("ssh2/package.json") as { version: string }).version
const addon = path.join(repoRoot, "node_modules/ssh2/lib/protocol/crypto/build/Release/sshcrypto.node")

describe("loadSsh2Addon", () => {
  it.runIf(fs.existsSync(addon))("gives the installed ssh2's addon when it is the bundled version", () => {
    const binding = loadSsh2Addon(require, installed) as Record<string, unknown>
    expect(typeof binding.AESGCMCipher).toBe("function")
    expect(typeof binding.AESGCMDecipher).toBe("function")
  })

  it("refuses the addon of another ssh2 version, naming both", () => {
    const loaded: Array<string> = []
    const load = (id: string) => {
      loaded.push(id)
      return require(id)
    }
    expect(() => loadSsh2Addon(load, "0.0.1")).toThrow(`the installed ssh2 is ${installed}, not the bundled 0.0.1`)
    expect(loaded).toEqual(["ssh2/package.json"])
  })

  it("throws when ssh2 or its addon cannot be found (ssh2 then uses node:crypto)", () => {
    const missing = (id: string) => {
      throw Object.assign(new Error(`Cannot find module '${id}'`), { code: "MODULE_NOT_FOUND" })
    }
    expect(() => loadSsh2Addon(missing, installed)).toThrow("Cannot find module 'ssh2/package.json'")
    const noAddon = (id: string) => (id === "ssh2/package.json" ? { version: installed } : missing(id))
    expect(() => loadSsh2Addon(noAddon, installed)).toThrow("sshcrypto.node")
  })
})

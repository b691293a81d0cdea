#!/usr/bin/env node
// Bundles the CLI into one file (dist/sicksync.mjs, also the agent uploaded to remotes) and
// writes the editor JSON Schemas generated from the config Schemas into schema/.
import { build } from "esbuild"
import { execFileSync } from "node:child_process"
import { createHash } from "node:crypto"
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { fileURLToPath } from "node:url"

const root = join(dirname(fileURLToPath(import.meta.url)), "..")
const common = {
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  logLevel: "warning",
  // ws's optional native helpers and ssh2's optional cpu-features are not needed; nor is ssh2's
  // optional native crypto addon (*.node, built by npm ci): ssh2 falls back to node:crypto without it.
  external: ["bufferutil", "utf-8-validate", "cpu-features", "*.node"],
  // Bundled CommonJS dependencies call require() (and ssh2's poly1305 reads __dirname at load): give the ESM bundle them.
  banner: {
    js:
      "import { createRequire as __sicksyncRequire } from 'node:module'; const require = __sicksyncRequire(import.meta.url);" +
      " import { fileURLToPath as __sicksyncPath } from 'node:url'; const __filename = __sicksyncPath(import.meta.url);" +
      " const __dirname = require('node:path').dirname(__filename);"
  },
  legalComments: "none",
  // Prefer ESM builds: jsonc-parser's UMD main cannot be bundled.
  mainFields: ["module", "main"],
  // No keepNames: Effect names errors by their tags, and keeping every function's name cost a
  // defineProperty per closure made (start-up 0.41 -> 0.39 s, 7 % of the bundle).
  minify: true
}

/**
 * ssh2 requires its optional native crypto addon from beside its own file, which is not there once
 * bundled: that require gets src/services/ssh/nativeCrypto.ts instead, which takes the addon from the
 * ssh2 package installed with sicksync when it is the version bundled (and throws otherwise, which
 * ssh2 takes as no addon).
 */
const ssh2Version = JSON.parse(readFileSync(join(root, "node_modules/ssh2/package.json"), "utf8")).version
// An install must get the very ssh2 bundled, or its addon goes unused: package.json pins it.
const ssh2Wanted = JSON.parse(readFileSync(join(root, "package.json"), "utf8")).dependencies.ssh2
if (ssh2Wanted !== ssh2Version) throw new Error(`package.json must pin ssh2 to the version installed and bundled (${ssh2Version}), not ${ssh2Wanted}`)
const ssh2NativeCrypto = {
  name: "ssh2-native-crypto",
  setup(b) {
    b.onResolve({ filter: /^\.\/crypto\/build\/Release\/sshcrypto\.node$/ }, () => ({ path: "sshcrypto", namespace: "ssh2-native-crypto" }))
    b.onLoad({ filter: /.*/, namespace: "ssh2-native-crypto" }, () => ({
      contents:
        `const { loadSsh2Addon } = require(${JSON.stringify(join(root, "src/services/ssh/nativeCrypto.ts"))})\n` +
        `module.exports = loadSsh2Addon((id) => require(id), ${JSON.stringify(ssh2Version)})\n`,
      loader: "js",
      resolveDir: root
    }))
  }
}

// The CLI: a CommonJS bundle, embedded in src/bin/launcher.mjs, which compiles it with V8's code cache.
const program = await build({
  ...common,
  plugins: [ssh2NativeCrypto],
  entryPoints: [join(root, "src/bin/sicksync.ts")],
  format: "cjs",
  write: false,
  outfile: join(root, "dist/sicksync.cjs"),
  banner: {},
  // The launcher passes its own URL in; `require`, `__filename` and `__dirname` come from it too.
  define: { "import.meta.url": "__sicksyncUrl" }
})
const code = program.outputFiles[0].text.replace(/^#!.*\n/, "")
// Strict, as the ES modules it was bundled from.
const wrapped = `(function (exports, require, module, __filename, __dirname, __sicksyncUrl) {"use strict";\n${code}\n})`
const launcher = readFileSync(join(root, "src/bin/launcher.mjs"), "utf8")
  .replace('"__SICKSYNC_PROGRAM__"', () => JSON.stringify(wrapped))
  .replace("__SICKSYNC_KEY__", createHash("sha256").update(wrapped).digest("hex").slice(0, 16))
mkdirSync(join(root, "dist"), { recursive: true })
writeFileSync(join(root, "dist/sicksync.mjs"), launcher)
chmodSync(join(root, "dist/sicksync.mjs"), 0o755)

// The library (`import ... from "sicksync"`): its dependencies stay packages of the embedding
// program, so that it shares one `effect` with them. Types: `npm run build:types`.
await build({
  ...common,
  entryPoints: [join(root, "src/index.ts")],
  outfile: join(root, "dist/index.mjs"),
  packages: "external",
  banner: {},
  minify: false
})

await build({ ...common, entryPoints: [join(root, "scripts/gen-schema.ts")], outfile: join(root, "dist/gen-schema.mjs") })
mkdirSync(join(root, "schema"), { recursive: true })
execFileSync(process.execPath, [join(root, "dist/gen-schema.mjs"), join(root, "schema")], { stdio: "inherit" })

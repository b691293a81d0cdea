/**
 * ssh2's optional native crypto addon, for the bundled ssh2.
 *
 * ssh2 encrypts each packet in one call to its addon when it can load it (built by its install
 * script where a compiler is available), and otherwise with node:crypto: a new cipher object and
 * five calls per packet, three socket writes, a fresh buffer for the ciphertext. In an initial sync
 * of 200 MB over SSH (6,400 packets of 32 KB) the addon saved the client ~0.3 s of CPU and the sync
 * 200–340 ms (`scripts/bench reconcile --ssh` harness, 4 alternating pairs: 3,152 / 3,405 / 3,288 /
 * 3,354 ms without, 2,815 / 3,070 / 3,085 / 3,057 ms with).
 *
 * ssh2 looks for the addon beside its own file, which bundling does away with; scripts/build.mjs
 * points that `require` here instead. The addon is taken from the ssh2 package installed with
 * sicksync (package.json pins ssh2 to the exact version bundled), and only if it is that very
 * version: its native interface is ssh2's internal business. Anything else throws, which ssh2 takes as
 * "no addon" and uses node:crypto. The agent on a remote never opens SSH connections, so never loads
 * ssh2 at all. Like ws's optional helpers (bufferutil), the package is looked up as Node looks up any
 * (node_modules up from the bundle's directory, NODE_PATH, ~/.node_modules).
 */

/** The installed ssh2's addon, when that ssh2 is `bundledVersion`; throws otherwise. */
export const loadSsh2Addon = (load: (id: string) => unknown, bundledVersion: string): unknown => {
  const installed = (load("ssh2/package.json") as { readonly version?: unknown }).version
  if (installed !== bundledVersion) {
    throw new Error(`the installed ssh2 is ${String(installed)}, not the bundled ${bundledVersion}: its addon is not used`)
  }
  return load("ssh2/lib/protocol/crypto/build/Release/sshcrypto.node")
}

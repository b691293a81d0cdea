import { fileURLToPath } from "node:url"
import { defineConfig } from "vitest/config"

export default defineConfig({
  // `import ... from "sicksync"` (the README's library example) means this checkout's sources.
  resolve: { alias: { sicksync: fileURLToPath(new URL("./src/index.ts", import.meta.url)) } },
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // End-to-end suites start real processes (daemons, sshd); two cores do not like many at once.
    maxConcurrency: 4,
    pool: "forks"
  }
})

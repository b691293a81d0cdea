import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // End-to-end suites start real processes (daemons, sshd); two cores do not like many at once.
    maxConcurrency: 4,
    pool: "forks"
  }
})

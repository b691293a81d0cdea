#!/usr/bin/env node
// Runs vitest and ends with the plain `N passed, N failed` line CI reads. Exit code: vitest's,
// and non-zero whenever a test failed or none ran.
import { spawnSync } from "node:child_process"
import { mkdtempSync, readFileSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"

const dir = mkdtempSync(join(tmpdir(), "sicksync-vitest-"))
const report = join(dir, "report.json")
const run = spawnSync(
  process.execPath,
  ["node_modules/vitest/vitest.mjs", "run", "--reporter=default", "--reporter=json", `--outputFile.json=${report}`, ...process.argv.slice(2)],
  { stdio: "inherit" }
)
let passed = 0
let failed = 0
let skipped = 0
try {
  const json = JSON.parse(readFileSync(report, "utf8"))
  passed = json.numPassedTests
  failed = json.numFailedTests
  skipped = json.numPendingTests + json.numTodoTests
  // A suite that failed to load has no failed tests but must fail the run.
  if (json.numFailedTestSuites > 0 && failed === 0) failed = json.numFailedTestSuites
} catch {
  failed = Math.max(failed, 1)
}
rmSync(dir, { recursive: true, force: true })
console.log(`${passed} passed, ${failed} failed${skipped > 0 ? `, ${skipped} skipped` : ""}`)
process.exit(run.status !== 0 || failed > 0 || passed === 0 ? 1 : 0)

// Writes the editor JSON Schemas for both config files, generated from the same Schemas the CLI validates with.
import { JSONSchema } from "effect"
import { writeFileSync } from "node:fs"
import { join } from "node:path"
import { ProjectFile, Registry } from "../src/schemas/ConfigFile.js"

const out = process.argv[2] ?? "schema"
for (const [name, schema] of [["project", ProjectFile], ["registry", Registry]] as const) {
  writeFileSync(join(out, `${name}.schema.json`), `${JSON.stringify(JSONSchema.make(schema), null, 2)}\n`)
}

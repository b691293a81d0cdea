// Writes the editor JSON Schemas for both config files, generated from the same Schemas the CLI validates with.
import { JSONSchema } from "effect"
import { writeFileSync } from "node:fs"
import { join } from "node:path"
import { ProjectFile, Registry } from "../src/schemas/ConfigFile.js"

const out = process.argv[2] ?? "schema"
const write = (name: string, jsonSchema: object) =>
  writeFileSync(join(out, `${name}.schema.json`), `${JSON.stringify(jsonSchema, null, 2)}\n`)
write("project", JSONSchema.make(ProjectFile))
write("registry", JSONSchema.make(Registry))

import { version } from "../package.json"

/** The package version; daemons of another version are never spoken to. */
export const VERSION: string = version

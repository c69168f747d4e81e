// index.d.ts type-checks and matches what src/index.js exports.

import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import * as client from "shoal-client";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");

test("tsc --noEmit accepts the declarations and their documented use", () => {
  const tsc = join(root, "node_modules", "typescript", "bin", "tsc");
  const run = spawnSync(process.execPath, [tsc, "-p", join(root, "test", "tsconfig.json")], { encoding: "utf8", timeout: 120_000 });
  assert.equal(run.status, 0, run.stdout + run.stderr);
});

test("every runtime export is declared", () => {
  const declared = readFileSync(join(root, "index.d.ts"), "utf8");
  for (const name of Object.keys(client)) {
    assert.match(declared, new RegExp(`export declare (const|class|function) ${name}\\b`), `${name} is not declared`);
  }
});

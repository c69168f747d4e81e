// Refresh the copies the browser page loads (server/static/vendor/): the client's own modules
// (src/*.js -> vendor/shoal-client/) and the ESM build of @msgpack/msgpack (-> vendor/msgpack/).
// The page maps the bare specifier "@msgpack/msgpack" to the latter with an import map, so it
// runs exactly this package's code. tests/test_js_client.py fails when a copy differs.
// Usage: npm run vendor (from clients/js, after npm ci).

import { cpSync, copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const vendor = join(root, "..", "..", "server", "static", "vendor");

const clientOut = join(vendor, "shoal-client");
rmSync(clientOut, { recursive: true, force: true });
mkdirSync(clientOut, { recursive: true });
for (const name of readdirSync(join(root, "src"))) {
  if (name.endsWith(".js")) copyFileSync(join(root, "src", name), join(clientOut, name));
}

const msgpack = join(root, "node_modules", "@msgpack", "msgpack");
const msgpackOut = join(vendor, "msgpack");
rmSync(msgpackOut, { recursive: true, force: true });
cpSync(join(msgpack, "dist.esm"), msgpackOut, { recursive: true, filter: (src) => !/\.(map|d\.ts|tsbuildinfo)$/.test(src) });
copyFileSync(join(msgpack, "LICENSE"), join(msgpackOut, "LICENSE"));

console.log(`vendored into ${relative(process.cwd(), vendor) || "."}: shoal-client/, msgpack/`);

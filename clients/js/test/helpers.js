// Shared by the tests that need a real Shoal server: its base URL comes from SHOAL_URL (the
// pytest wrapper tests/test_js_client.py sets it to the session server; standalone:
// `SHOAL_URL=http://127.0.0.1:8080 npm test`).

import { randomUUID } from "node:crypto";

/** The server's base URL; throws (the test fails, it never skips) when SHOAL_URL is unset. */
export function serverUrl() {
  const url = process.env.SHOAL_URL;
  if (!url) throw new Error("SHOAL_URL is not set: point it at a running `shoal serve` (e.g. http://127.0.0.1:8080)");
  return url.replace(/\/+$/, "");
}

/** A collection name no other test (or earlier run) uses. */
export function uniqueName(prefix) {
  return `${prefix}_${randomUUID().replaceAll("-", "").slice(0, 10)}`;
}

/** Resolve with the first `n` values of an async iterator, rejecting after `ms`. */
export async function take(iterator, n, ms = 20_000) {
  const out = [];
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`only ${out.length} of ${n} events within ${ms} ms: ${JSON.stringify(out)}`)), ms);
  });
  try {
    while (out.length < n) {
      const step = await Promise.race([iterator.next(), timeout]);
      if (step.done) break;
      out.push(step.value);
    }
  } finally {
    clearTimeout(timer);
  }
  return out;
}

/** Poll `predicate` until true, failing after `ms`. */
export async function until(predicate, ms = 10_000, what = "condition") {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** A unit vector of `dim` values pointing mostly along axis `axis`. */
export function unit(dim, axis, tilt = 0) {
  const v = new Float32Array(dim);
  v[axis] = 1;
  v[(axis + 1) % dim] = tilt;
  return v;
}

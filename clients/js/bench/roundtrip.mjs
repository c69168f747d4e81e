// Sequential `query` round trips of the JavaScript client: N queries with a random vector, k=10,
// one at a time on one connection. Prints one JSON line {client, n, median_ms, p99_ms}.
// Usage: node bench/roundtrip.mjs WS_URL COLLECTION DIM [N]  (driven by `python -m load.js_roundtrip`)

import { ShoalClient } from "shoal-client";

const [url, collection, dimText, nText = "2000"] = process.argv.slice(2);
const dim = Number(dimText);
const n = Number(nText);
const db = await ShoalClient.connect(url);
const vectors = Array.from({ length: 64 }, () => Float32Array.from({ length: dim }, () => Math.random() - 0.5));
for (let i = 0; i < 100; i++) await db.query(collection, { vector: vectors[i % 64], k: 10 }); // warm-up
const times = [];
for (let i = 0; i < n; i++) {
  const t0 = process.hrtime.bigint();
  await db.query(collection, { vector: vectors[i % 64], k: 10 });
  times.push(Number(process.hrtime.bigint() - t0) / 1e6);
}
await db.close();
times.sort((a, b) => a - b);
const at = (q) => times[Math.min(times.length - 1, Math.floor(q * times.length))];
console.log(JSON.stringify({ client: "js", n, median_ms: +at(0.5).toFixed(3), p99_ms: +at(0.99).toFixed(3) }));

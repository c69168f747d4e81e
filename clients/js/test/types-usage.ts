// Compiled (never run) by types.test.js with `tsc --noEmit`: the declarations cover the public
// API as the README uses it, and reject what the API does not take.

import {
  ConnectionClosed,
  NotFound,
  RateLimited,
  ShoalClient,
  ShoalError,
  changesSSE,
  subscribeSSE,
  type GetResult,
  type Hit,
  type Push,
  type QueryResult,
} from "shoal-client";

export async function usage(url: string): Promise<number> {
  const db = await ShoalClient.connect(url, { connectTimeoutMs: 5000, timeoutMs: 10_000 });
  const info = await db.createCollection("docs", { dim: 3, metric: "cosine", ifNotExists: true });
  const dim: number = info.dim;
  await db.upsert("docs", [{ id: "a", vector: new Float32Array([1, 0, 0]), metadata: { lang: "en", tags: ["x"] } }]);
  const result: QueryResult = await db.query("docs", { vector: [1, 0, 0], k: 5, where: { lang: "en" }, include: ["metadata"], timeoutMs: 2000 });
  const best: Hit | undefined = result.hits[0];
  const batch = await db.queryBatch("docs", [{ vector: [1, 0, 0], k: 2 }, { like: "a", where: { lang: "en" } }]);
  const firstOfBatch: QueryResult | ShoalError | undefined = batch[0];
  const n: number = await db.count("docs");
  const { docs } = await db.get("docs", ["a"], { include: "vector" });
  const v: Float32Array | undefined = docs[0]?.vector;
  // Paging: the options form of get, following next_cursor until it is null.
  let cursor: string | null | undefined;
  do {
    const page: GetResult = await db.get("docs", { where: { lang: "en" }, whereText: { $contains: "x" }, limit: 10, ...(cursor ? { cursor } : {}) });
    cursor = page.next_cursor;
  } while (cursor != null);
  await db.delete("docs", ["a"]);
  await db.delete("docs", { where: { lang: "en" } });
  const sub = await db.subscribe("docs", { text: "hello", threshold: 0.5, afterSeq: 10 });
  for await (const push of sub) {
    const p: Push = push;
    if (p.event === "match") console.log(p.seq, p.hit.score);
    else if (p.event === "ended") console.log(p.code, p.reason);
    break;
  }
  await sub.unsubscribe();
  for await (const ev of subscribeSSE(url, "docs", { text: "hi", threshold: 0.4, lastEventId: 3, reconnect: true })) {
    console.log(ev.id, ev.event, ev.data.seq);
  }
  const changes = changesSSE(url, "docs", { lastEventId: "0" });
  changes.close();
  try {
    await db.dropCollection("docs");
  } catch (err) {
    if (err instanceof NotFound) console.log(err.code, err.serverMessage);
    if (err instanceof RateLimited) console.log(err.retryAfterMs ?? 0);
    if (err instanceof ShoalError) console.log(err.extra);
    if (err instanceof ConnectionClosed) console.log(err.closeCode);
  }
  // @ts-expect-error: upsert takes an array of documents, each with an id
  await db.upsert("docs", { text: "no id" });
  // @ts-expect-error: a cursor is the opaque string a page answered, not a position
  await db.get("docs", { limit: 10, cursor: 10 });
  // @ts-expect-error: include names only text, metadata, vector
  await db.query("docs", { text: "x", include: ["everything"] });
  await db.close();
  return dim + n + (best?.score ?? 0) + (v?.length ?? 0) + (firstOfBatch instanceof ShoalError ? 1 : 0);
}

// Live result sets against a real Shoal server (SHOAL_URL): leave pushes of a threshold
// subscription, and a top-k subscription's lists (first the current one, then each change).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { ShoalClient, subscribeSSE } from "shoal-client";
import { serverUrl, take, uniqueName } from "./helpers.js";

let db;

before(async () => {
  db = await ShoalClient.connect(serverUrl());
});

after(async () => {
  await db.close();
});

const HOT = [1, 0, 0, 0];

test("a threshold subscription pushes leave when a match is re-upserted out or deleted", async () => {
  const name = uniqueName("js_leave");
  await db.createCollection(name, { dim: 4 });
  const sub = await db.subscribe(name, { vector: HOT, threshold: 0.9 });
  const a = await db.upsert(name, [{ id: "a", vector: HOT }]);
  const moved = await db.upsert(name, [{ id: "a", vector: [0, 1, 0, 0] }]);
  await db.upsert(name, [{ id: "b", vector: HOT }]);
  const gone = await db.delete(name, { ids: ["b"] });
  const events = await take(sub, 4);
  assert.deepEqual(
    events.map((e) => [e.event, e.seq, e.event === "match" ? e.hit.id : e.id]),
    [
      ["match", a.seq, "a"],
      ["leave", moved.seq, "a"],
      ["match", gone.seq - 1, "b"],
      ["leave", gone.seq, "b"],
    ],
  );
  await sub.unsubscribe();
});

test("a top-k subscription sends the current list, then the whole new list on each change", async () => {
  const name = uniqueName("js_topk");
  await db.createCollection(name, { dim: 4 });
  const first = await db.upsert(name, [
    { id: "w", vector: [1, 0.5, 0, 0] },
    { id: "c", vector: [0, 1, 0, 0] },
  ]);
  const sub = await db.subscribe(name, { vector: HOT, k: 2, include: "metadata" });
  const [initial] = await take(sub, 1);
  assert.equal(initial.event, "topk");
  assert.equal(initial.seq, first.seq);
  assert.deepEqual(initial.hits.map((h) => h.id), ["w", "c"]);
  const best = await db.upsert(name, [{ id: "h", vector: HOT, metadata: { n: 1 } }]);
  const [next] = await take(sub, 1);
  assert.equal(next.event, "topk");
  assert.equal(next.seq, best.seq);
  assert.deepEqual(next.hits.map((h) => h.id), ["h", "w"]);
  assert.deepEqual(next.hits[0].metadata, { n: 1 });
  const deleted = await db.delete(name, { ids: ["h"] });
  const [refilled] = await take(sub, 1);
  assert.equal(refilled.seq, deleted.seq);
  assert.deepEqual(refilled.hits.map((h) => h.id), ["w", "c"]);
  await sub.unsubscribe();

  // The same over SSE: the current list first.
  const stream = subscribeSSE(serverUrl(), name, { vector: HOT, k: 2 });
  const [sse] = await take(stream[Symbol.asyncIterator](), 1);
  assert.equal(sse.event, "topk");
  assert.deepEqual(sse.data.hits.map((h) => h.id), ["w", "c"]);
  await stream.return?.();
});

// The SSE helpers against a real Shoal server (SHOAL_URL), over fetch + the stream parser
// (Node has no EventSource; the browser test covers the EventSource path).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { BadRequest, NotFound, ShoalClient, changesSSE, subscribeSSE } from "shoal-client";
import { serverUrl, take, uniqueName } from "./helpers.js";

let db;
let name;

before(async () => {
  db = await ShoalClient.connect(serverUrl());
  name = uniqueName("js_sse");
  await db.createCollection(name, { dim: 3 });
});

after(async () => {
  await db.close();
});

/** Open a stream and wait until the server has accepted it (onopen); resolves with the stream
 * and the promise of its first event. */
async function opened(open) {
  let accepted;
  const ready = new Promise((resolve) => (accepted = resolve));
  const stream = open(accepted);
  const first = stream.next();
  await ready;
  return { stream, first };
}

test("subscribeSSE receives a match for an upsert; lastEventId resumes after it", async () => {
  const { stream, first } = await opened((onopen) => subscribeSSE(serverUrl(), name, { vector: [1, 0, 0], threshold: 0.9, include: ["metadata"], onopen }));
  const up1 = await db.upsert(name, [{ id: "far", vector: [0, 0, 1] }, { id: "near", vector: [1, 0.05, 0], metadata: { n: 1 } }]);
  const up2 = await db.upsert(name, [{ id: "near2", vector: [1, 0, 0.05] }]);
  const { value: event } = await first;
  assert.equal(event.event, "match");
  assert.equal(event.id, String(up1.seq));
  assert.equal(event.data.seq, up1.seq);
  assert.equal(event.data.hit.id, "near");
  assert.deepEqual(event.data.hit.metadata, { n: 1 });
  assert.equal(stream.lastEventId, String(up1.seq));
  await stream.return();

  // A new stream resuming after the first match replays the second from the log, and only it.
  const resumed = subscribeSSE(serverUrl(), name, { vector: [1, 0, 0], threshold: 0.9, lastEventId: event.id });
  const [replayed] = await take(resumed, 1);
  assert.equal(replayed.data.hit.id, "near2");
  assert.equal(replayed.data.seq, up2.seq);
  resumed.close();
});

test("changesSSE streams every change from lastEventId, upserts and deletes", async () => {
  const coll = uniqueName("js_changes");
  await db.createCollection(coll, { dim: 3 });
  const up = await db.upsert(coll, [{ id: "a", vector: [1, 0, 0] }, { id: "b", vector: [0, 1, 0] }]);
  const del = await db.delete(coll, ["a"]);
  const stream = changesSSE(serverUrl(), coll, { lastEventId: 0 });
  const events = await take(stream, 2);
  assert.deepEqual(events.map((e) => e.event), ["upsert", "delete"]);
  assert.deepEqual(events[0].data.ids, ["a", "b"]);
  assert.equal(events[0].data.seq, up.seq);
  assert.deepEqual(events[1].data.ids, ["a"]);
  assert.equal(events[1].id, String(del.seq));
  stream.close();
  await db.dropCollection(coll);
});

test("close() ends a stream whose next() is waiting", async () => {
  const stream = changesSSE(serverUrl(), name);
  const waiting = stream.next();
  await new Promise((resolve) => setTimeout(resolve, 200));
  stream.close();
  assert.deepEqual(await waiting, { value: undefined, done: true });
});

test("a refused stream throws the server's typed error before any event", async () => {
  await assert.rejects(subscribeSSE(serverUrl(), name, { vector: [1, 0, 0] }).next(), (err) => err instanceof BadRequest && err.code === "bad_request");
  await assert.rejects(subscribeSSE(serverUrl(), name, { vector: [1, 0], threshold: 0.5 }).next(), (err) => err.code === "dimension_mismatch");
  await assert.rejects(changesSSE(serverUrl(), uniqueName("nope")).next(), (err) => err instanceof NotFound && err.code === "not_found");
});

test("an event: error block (collection dropped) throws its typed error after the events", async () => {
  const coll = uniqueName("js_sse_drop");
  await db.createCollection(coll, { dim: 3 });
  const { stream, first } = await opened((onopen) => subscribeSSE(serverUrl(), coll, { vector: [1, 0, 0], threshold: 0.5, onopen }));
  await db.upsert(coll, [{ id: "a", vector: [1, 0, 0] }]);
  assert.equal((await first).value.data.hit.id, "a");
  await db.dropCollection(coll);
  await assert.rejects(stream.next(), (err) => err instanceof NotFound && err.code === "not_found");
});

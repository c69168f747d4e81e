// The WebSocket client against a real Shoal server (SHOAL_URL): every op, typed errors,
// requests in flight, subscriptions with resume, and close().

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  BadRequest,
  ConnectionClosed,
  DimensionMismatch,
  Exists,
  Forbidden,
  InvalidVector,
  NotFound,
  ShoalClient,
  ShoalError,
  Subscription,
  TooLarge,
  UnknownOp,
} from "shoal-client";
import { serverUrl, take, uniqueName, unit, until } from "./helpers.js";

const DIM = 8;
let db;

before(async () => {
  db = await ShoalClient.connect(serverUrl());
});

after(async () => {
  await db.close();
});

/** Follow next_cursor from the first page until it is null or absent; the ids seen and each
 * page's size. */
async function walkPages(name, options) {
  const ids = [];
  const sizes = [];
  let cursor = null;
  do {
    const page = await db.get(name, { ...options, ...(cursor ? { cursor } : {}) });
    ids.push(...page.docs.map((d) => d.id));
    sizes.push(page.docs.length);
    cursor = page.next_cursor;
    assert.ok(sizes.length <= 30, "the cursor never ends");
  } while (cursor != null);
  return { ids, sizes };
}

describe("every op", () => {
  test("ping, create, list, upsert, get, count, query, delete, drop", async () => {
    const name = uniqueName("js_ops");
    assert.deepEqual(await db.ping(), {});
    const created = await db.createCollection(name, { dim: DIM, metric: "cosine" });
    assert.deepEqual([created.name, created.dim, created.metric, created.count], [name, DIM, "cosine", 0]);
    assert.equal((await db.createCollection(name, { dim: DIM, ifNotExists: true })).name, name);
    assert.ok((await db.listCollections()).some((c) => c.name === name));

    const docs = [0, 1, 2, 3].map((i) => ({ id: `d${i}`, vector: unit(DIM, i, 0.1), text: `doc ${i}`, metadata: { i, even: i % 2 === 0 } }));
    const up = await db.upsert(name, docs);
    assert.equal(up.count, 4);
    assert.ok(Number.isInteger(up.seq) && up.seq >= 4);
    assert.equal(await db.count(name), 4);

    const got = await db.get(name, ["d1", "missing"], { include: ["text", "metadata", "vector"] });
    assert.deepEqual(got.docs.map((d) => d.id), ["d1"]);
    assert.ok(got.docs[0].vector instanceof Float32Array && got.docs[0].vector.length === DIM);
    assert.equal(got.docs[0].metadata.i, 1);

    const result = await db.query(name, { vector: unit(DIM, 2), k: 3, include: "metadata" });
    assert.equal(result.hits.length, 3);
    assert.equal(result.hits[0].id, "d2");
    assert.ok(result.hits[0].score > result.hits[1].score);
    assert.equal(typeof result.took_ms, "number");
    const filtered = await db.query(name, { vector: new Float32Array(unit(DIM, 2)), k: 10, where: { i: { $gte: 3 } } });
    assert.deepEqual(filtered.hits.map((h) => h.id), ["d3"]);
    const byText = await db.query(name, { vector: unit(DIM, 0), k: 4, whereText: { $contains: "doc 1" } });
    assert.deepEqual(byText.hits.map((h) => h.id), ["d1"]);

    const removed = await db.delete(name, ["d0"]);
    assert.equal(removed.deleted, 1);
    assert.ok(removed.seq > up.seq);
    const removedByFilter = await db.delete(name, { where: { i: 3 } });
    assert.equal(removedByFilter.deleted, 1);
    assert.equal(await db.count(name), 2);

    await db.dropCollection(name);
    assert.ok(!(await db.listCollections()).some((c) => c.name === name));
  });

  test("queryBatch answers each query as query does, and keeps one query's error in its slot", async () => {
    const name = uniqueName("js_batch");
    await db.createCollection(name, { dim: DIM });
    await db.upsert(name, [0, 1, 2, 3, 4, 5].map((i) => ({ id: `b${i}`, vector: unit(DIM, i, 0.1), metadata: { i } })));
    const queries = [
      { vector: unit(DIM, 2), k: 3, include: "vector" },
      { vector: new Float32Array(unit(DIM, 4)), k: 2, where: { i: { $lt: 4 } } },
      { like: "b1", k: 2 },
      { like: "missing" },
      { vector: unit(DIM + 1, 0) },
    ];
    const batch = await db.queryBatch(name, queries);
    assert.equal(batch.length, 5);
    for (const i of [0, 1, 2]) {
      const alone = await db.query(name, queries[i]);
      assert.deepEqual(batch[i].hits.map((h) => [h.id, h.score]), alone.hits.map((h) => [h.id, h.score]));
      assert.equal(typeof batch[i].took_ms, "number");
    }
    assert.ok(batch[0].hits[0].vector instanceof Float32Array && batch[0].hits[0].vector.length === DIM);
    assert.ok(!batch[2].hits.some((h) => h.id === "b1"));
    assert.ok(batch[3] instanceof NotFound && batch[3] instanceof ShoalError);
    assert.ok(batch[4] instanceof DimensionMismatch);
    await assert.rejects(db.queryBatch(name, [{ vector: unit(DIM, 0), k: 0 }]), (err) => err instanceof BadRequest && /queries\[0\]/.test(err.message));
    await db.dropCollection(name);
  });

  test("get pages with where, limit and cursor: every id once, in id order", async () => {
    const name = uniqueName("js_pages");
    await db.createCollection(name, { dim: DIM });
    const ids = Array.from({ length: 25 }, (_, i) => `p${String(i).padStart(2, "0")}`);
    const docs = ids.map((id, i) => ({
      id,
      vector: unit(DIM, i % DIM, 0.1),
      metadata: { odd: i % 2 === 1 },
      ...(i % 5 === 0 ? { text: `fifth ${i}` } : {}),
    }));
    // Written out of order, so the id order of the pages is the server's doing, not ours.
    await db.upsert(name, [...docs].reverse());
    const all = await walkPages(name, { limit: 10 });
    // Three pages and no fourth: the third answered next_cursor null (or left it out).
    assert.deepEqual(all.sizes, [10, 10, 5]);
    assert.deepEqual(all.ids, ids);
    // The filter goes with every page, cursor included: 12 odd ids in pages of 5.
    const odd = await walkPages(name, { where: { odd: true }, limit: 5 });
    assert.deepEqual(odd.sizes, [5, 5, 2]);
    assert.deepEqual(odd.ids, ids.filter((_, i) => i % 2 === 1));
    const fifths = await db.get(name, { whereText: { $contains: "fifth" }, limit: 100, include: ["text"] });
    assert.deepEqual(fifths.docs.map((d) => [d.id, d.text]), [0, 5, 10, 15, 20].map((i) => [ids[i], `fifth ${i}`]));
    assert.ok(fifths.next_cursor == null);
    await assert.rejects(db.get(name, { cursor: "not-a-cursor" }), BadRequest);
    await db.dropCollection(name);
  });

  test("text documents are embedded by the server and found by meaning", async () => {
    const name = uniqueName("js_text");
    await db.createCollection(name);
    await db.upsert(name, [
      { id: "cat", text: "A cat is sleeping on the warm windowsill." },
      { id: "tax", text: "The quarterly tax filing deadline is next Monday." },
    ]);
    const { hits } = await db.query(name, { text: "a kitten napping by the window", k: 2 });
    assert.equal(hits[0].id, "cat");
    await db.dropCollection(name);
  });
});

describe("errors carry their code", () => {
  test("not_found, exists, dimension_mismatch, invalid_vector, bad_request, unknown_op", async () => {
    const name = uniqueName("js_err");
    await db.createCollection(name, { dim: 3 });
    const cases = [
      [() => db.query(uniqueName("nope"), { vector: [1, 0, 0] }), NotFound, "not_found"],
      [() => db.createCollection(name, { dim: 3 }), Exists, "exists"],
      [() => db.query(name, { vector: [1, 0], k: 1 }), DimensionMismatch, "dimension_mismatch"],
      [() => db.upsert(name, [{ id: "n", vector: [NaN, 0, 0] }]), InvalidVector, "invalid_vector"],
      [() => db.query(name, { vector: [1, 0, 0], where: { x: { $regex: "a" } } }), BadRequest, "bad_request"],
      [() => db.query(name, { vector: [1, 0, 0], misspelt: 1 }), BadRequest, "bad_request"],
      [() => db.request("frobnicate"), UnknownOp, "unknown_op"],
      [() => db.dropCollection(uniqueName("nope")), NotFound, "not_found"],
    ];
    for (const [call, cls, code] of cases) {
      await assert.rejects(call, (err) => {
        assert.ok(err instanceof cls, `${code}: got ${err}`);
        assert.ok(err instanceof ShoalError);
        assert.equal(err.code, code);
        assert.ok(err.serverMessage.length > 0);
        return true;
      });
    }
    // The connection survives every refusal.
    assert.deepEqual(await db.ping(), {});
    await db.dropCollection(name);
  });

  test("a frame over maxRequestBytes is refused by the client, nothing sent", async () => {
    const small = await ShoalClient.connect(serverUrl(), { maxRequestBytes: 1024 });
    try {
      await assert.rejects(small.upsert("any", [{ id: "big", text: "x".repeat(4096) }]), (err) => err instanceof TooLarge && err.code === "too_large");
      assert.equal(small.inFlight, 0);
      assert.deepEqual(await small.ping(), {});
    } finally {
      await small.close();
    }
  });

  test("a refused handshake rejects connect with the server's typed error", async () => {
    await assert.rejects(
      ShoalClient.connect(serverUrl(), { headers: { Origin: "http://elsewhere.example" } }),
      (err) => err instanceof Forbidden && err.code === "forbidden",
    );
  });

  test("an unreachable server rejects connect with ConnectionClosed", async () => {
    await assert.rejects(ShoalClient.connect("ws://127.0.0.1:9/v1/ws", { connectTimeoutMs: 3000 }), ConnectionClosed);
  });
});

describe("requests in flight", () => {
  test("many concurrent requests are each answered by id", async () => {
    const name = uniqueName("js_conc");
    await db.createCollection(name, { dim: DIM });
    await db.upsert(name, Array.from({ length: DIM }, (_, i) => ({ id: `a${i}`, vector: unit(DIM, i) })));
    const axes = Array.from({ length: 200 }, (_, n) => n % DIM);
    const pending = axes.map((axis) => db.query(name, { vector: unit(DIM, axis), k: 1 }));
    assert.ok(db.inFlight > 1, "requests were pipelined");
    const replies = await Promise.all([...pending, db.count(name), db.ping()]);
    axes.forEach((axis, n) => assert.equal(replies[n].hits[0].id, `a${axis}`));
    assert.equal(replies[200], DIM);
    assert.equal(db.inFlight, 0);
    await db.dropCollection(name);
  });

  test("close() rejects every pending request with ConnectionClosed and ends subscriptions", async () => {
    const name = uniqueName("js_close");
    const conn = await ShoalClient.connect(serverUrl());
    await conn.createCollection(name, { dim: 3 });
    const sub = await conn.subscribe(name, { vector: [1, 0, 0], threshold: 0.5 });
    const pending = Array.from({ length: 20 }, () => conn.count(name));
    const closing = conn.close();
    const results = await Promise.allSettled(pending);
    for (const r of results) {
      assert.equal(r.status, "rejected");
      assert.ok(r.reason instanceof ConnectionClosed, String(r.reason));
    }
    await closing;
    assert.ok(conn.closed);
    await assert.rejects(sub.next(), ConnectionClosed);
    await assert.rejects(conn.ping(), ConnectionClosed);
    await sub.unsubscribe(); // harmless once closed
    await db.dropCollection(name);
  });
});

describe("subscriptions", () => {
  test("a subscription receives a match for an upsert, as the protocol's push map", async () => {
    const name = uniqueName("js_sub");
    await db.createCollection(name, { dim: 3 });
    const sub = await db.subscribe(name, { vector: [1, 0, 0], threshold: 0.9, include: ["metadata", "vector"] });
    assert.ok(sub instanceof Subscription);
    assert.equal(typeof sub.sub, "string");
    const up = await db.upsert(name, [
      { id: "far", vector: [0, 1, 0] },
      { id: "near", vector: [1, 0.05, 0], metadata: { tag: "x" } },
    ]);
    const [push] = await take(sub, 1);
    assert.equal(push.event, "match");
    assert.equal(push.sub, sub.sub);
    assert.equal(push.seq, up.seq);
    assert.equal(push.op, "upsert");
    assert.equal(push.hit.id, "near");
    assert.ok(push.hit.score >= 0.9);
    assert.deepEqual(push.hit.metadata, { tag: "x" });
    assert.ok(push.hit.vector instanceof Float32Array);
    await sub.unsubscribe();
    await sub.unsubscribe(); // idempotent
    assert.deepEqual(await sub.next(), { value: undefined, done: true });
    await db.dropCollection(name);
  });

  test("afterSeq replays later matches from the log, in seq order, then goes live", async () => {
    const name = uniqueName("js_resume");
    await db.createCollection(name, { dim: 3 });
    const first = await db.upsert(name, [{ id: "m1", vector: [1, 0, 0] }]);
    await db.upsert(name, [{ id: "m2", vector: [1, 0.1, 0] }]);
    await db.upsert(name, [{ id: "m3", vector: [1, 0.2, 0] }]);
    const sub = await db.subscribe(name, { vector: [1, 0, 0], threshold: 0.5, afterSeq: first.seq });
    await db.upsert(name, [{ id: "m4", vector: [1, 0.3, 0] }]);
    const pushes = await take(sub, 3);
    assert.deepEqual(pushes.map((p) => p.hit.id), ["m2", "m3", "m4"]);
    assert.ok(pushes[0].seq < pushes[1].seq && pushes[1].seq < pushes[2].seq);
    await sub.unsubscribe();
    await db.dropCollection(name);
  });

  test("for await ... break unsubscribes; the server then forgets the sub", async () => {
    const name = uniqueName("js_break");
    await db.createCollection(name, { dim: 3 });
    const sub = await db.subscribe(name, { vector: [1, 0, 0], threshold: 0.5 });
    await db.upsert(name, [{ id: "a", vector: [1, 0, 0] }]);
    for await (const push of sub) {
      assert.equal(push.hit.id, "a");
      break;
    }
    await until(() => db.inFlight === 0, 5000, "unsubscribe reply");
    await assert.rejects(db.request("unsubscribe", { sub: sub.sub }), NotFound);
    await db.dropCollection(name);
  });

  test("an ended push (collection dropped) is delivered last, then iteration finishes", async () => {
    const name = uniqueName("js_ended");
    await db.createCollection(name, { dim: 3 });
    const sub = await db.subscribe(name, { vector: [1, 0, 0], threshold: 0.5 });
    await db.upsert(name, [{ id: "a", vector: [1, 0, 0] }]);
    await db.dropCollection(name);
    const pushes = await take(sub, 3);
    assert.deepEqual(pushes.map((p) => p.event), ["match", "ended"]);
    assert.equal(pushes[1].code, "not_found");
    assert.equal(pushes[1].sub, sub.sub);
    assert.equal(sub.ended, pushes[1]);
  });

  test("a consumer that falls queueSize behind reads a lagged event where the gap is", async () => {
    const name = uniqueName("js_lag");
    const conn = await ShoalClient.connect(serverUrl(), { queueSize: 2 });
    try {
      await conn.createCollection(name, { dim: 3 });
      const sub = await conn.subscribe(name, { vector: [1, 0, 0], threshold: 0.5 });
      for (let i = 0; i < 5; i++) await conn.upsert(name, [{ id: `x${i}`, vector: [1, i / 10, 0] }]);
      await until(() => sub.dropped === 3, 10_000, "3 dropped");
      const events = await take(sub, 3);
      assert.deepEqual(events.map((e) => e.event), ["match", "match", "lagged"]);
      assert.deepEqual(events.slice(0, 2).map((e) => e.hit.id), ["x0", "x1"]);
      assert.equal(events[2].dropped, 3);
      assert.equal(events[2].client, true);
      // Once read, the buffer takes new matches again.
      await conn.upsert(name, [{ id: "after", vector: [1, 0, 0] }]);
      const [next] = await take(sub, 1);
      assert.equal(next.hit.id, "after");
      await sub.unsubscribe();
      await conn.dropCollection(name);
    } finally {
      await conn.close();
    }
  });

  test("a bad subscription is refused with its code", async () => {
    await assert.rejects(db.subscribe(uniqueName("nope"), { vector: [1, 0, 0], threshold: 0.5 }), NotFound);
    const name = uniqueName("js_badsub");
    await db.createCollection(name, { dim: 3 });
    await assert.rejects(db.subscribe(name, { vector: [1, 0, 0] }), BadRequest); // threshold missing
    await db.dropCollection(name);
  });
});

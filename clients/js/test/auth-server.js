// Keys and scopes, against a server started with SHOAL_API_KEYS (not the default one, so this
// file is not a *.test.js: tests/test_js_client.py starts that server and runs it with
// SHOAL_AUTH_URL; standalone: `npm run test:auth` with SHOAL_AUTH_URL set). The server's keys:
// "admin-key" (admin on every collection) and "read-key" (read on every collection).

import assert from "node:assert/strict";
import { test } from "node:test";
import { Forbidden, ShoalClient, Unauthorized, subscribeSSE } from "shoal-client";
import { take, uniqueName } from "./helpers.js";

function authUrl() {
  const url = process.env.SHOAL_AUTH_URL;
  if (!url) throw new Error("SHOAL_AUTH_URL is not set: a server with SHOAL_API_KEYS (see this file's header)");
  return url;
}

test("no key: ops answer unauthorized; a key via the auth op opens access", async () => {
  const db = await ShoalClient.connect(authUrl());
  try {
    await assert.rejects(db.listCollections(), (err) => err instanceof Unauthorized && err.code === "unauthorized");
    await db.auth("admin-key");
    assert.ok(Array.isArray(await db.listCollections()));
  } finally {
    await db.close();
  }
});

test("connect({key}) authenticates; a wrong key rejects connect; a read key is forbidden to write", async () => {
  const name = uniqueName("js_auth");
  const admin = await ShoalClient.connect(authUrl(), { key: "admin-key" });
  const reader = await ShoalClient.connect(authUrl(), { key: "read-key" });
  try {
    await admin.createCollection(name, { dim: 3 });
    await assert.rejects(ShoalClient.connect(authUrl(), { key: "wrong-key" }), (err) => err instanceof Unauthorized);
    await assert.rejects(reader.upsert(name, [{ id: "a", vector: [1, 0, 0] }]), (err) => err instanceof Forbidden && err.code === "forbidden");

    // SSE: the key goes in the Authorization header (fetch); without it, unauthorized.
    await assert.rejects(subscribeSSE(authUrl(), name, { vector: [1, 0, 0], threshold: 0.5 }).next(), Unauthorized);
    let accepted;
    const ready = new Promise((resolve) => (accepted = resolve));
    const stream = subscribeSSE(authUrl(), name, { vector: [1, 0, 0], threshold: 0.5, key: "read-key", onopen: accepted });
    const first = take(stream, 1);
    await ready;
    await admin.upsert(name, [{ id: "a", vector: [1, 0, 0] }]);
    const [event] = await first;
    assert.equal(event.data.hit.id, "a");
    stream.close();
    assert.equal(await reader.count(name), 1);
    await admin.dropCollection(name);
  } finally {
    await Promise.all([admin.close(), reader.close()]);
  }
});

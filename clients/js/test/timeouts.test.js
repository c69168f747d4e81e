// Timeouts need a peer that stays silent, which a healthy Shoal server never is: these tests
// listen on 127.0.0.1 themselves (a real socket), as a server that accepts and never answers.

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { after, before, test } from "node:test";
import { WebSocketServer } from "ws";
import { ConnectionClosed, RequestTimeout, ShoalClient } from "shoal-client";

let silentWs;
let silentTcp;
const sockets = new Set();

before(async () => {
  silentWs = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: (protocols) => (protocols.has("shoal.v1") ? "shoal.v1" : false) });
  silentTcp = createServer((socket) => sockets.add(socket)); // accepts, never answers the handshake
  await Promise.all([
    new Promise((resolve) => silentWs.once("listening", resolve)),
    new Promise((resolve) => silentTcp.listen(0, "127.0.0.1", resolve)),
  ]);
});

after(async () => {
  for (const socket of sockets) socket.destroy();
  await new Promise((resolve) => silentTcp.close(resolve));
  for (const ws of silentWs.clients) ws.terminate();
  await new Promise((resolve) => silentWs.close(resolve));
});

test("a request with no reply rejects with RequestTimeout; others stay pending until close", async () => {
  const db = await ShoalClient.connect(`ws://127.0.0.1:${silentWs.address().port}/v1/ws`, { timeoutMs: 5000 });
  const started = Date.now();
  await assert.rejects(db.ping({ timeoutMs: 150 }), RequestTimeout);
  assert.ok(Date.now() - started >= 140);
  const untimed = db.request("ping", {}, { timeoutMs: 60_000 });
  assert.equal(db.inFlight, 1);
  const rejected = assert.rejects(untimed, ConnectionClosed);
  await db.close();
  await rejected;
});

test("a server that never completes the handshake rejects connect after connectTimeoutMs", async () => {
  const started = Date.now();
  await assert.rejects(ShoalClient.connect(`ws://127.0.0.1:${silentTcp.address().port}/v1/ws`, { connectTimeoutMs: 300 }), (err) => err instanceof ConnectionClosed && /timed out/.test(err.message));
  assert.ok(Date.now() - started < 5000);
});

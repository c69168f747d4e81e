// Unit tests of the pieces that need no server: vectors, frames, option names, URLs, errors.

import assert from "node:assert/strict";
import { test } from "node:test";
import { encode } from "@msgpack/msgpack";
import { decodeFrame, decodeVectors, encodeRequest, wireArgs } from "../src/codec.js";
import {
  BadRequest,
  ClientError,
  ConnectionClosed,
  DimensionMismatch,
  ERROR_CLASSES,
  Internal,
  NotFound,
  ProtocolError,
  RateLimited,
  ShoalError,
  decodeVector,
  encodeVector,
  errorFromWire,
  httpBase,
  wsUrl,
} from "shoal-client";

test("vectors go out as little-endian float32 bytes and come back as Float32Array", () => {
  const bytes = encodeVector([1, -2.5, 0.1]);
  assert.equal(bytes.byteLength, 12);
  const view = new DataView(bytes.buffer);
  assert.equal(view.getFloat32(0, true), 1);
  assert.equal(view.getFloat32(4, true), -2.5);
  assert.deepEqual(Array.from(decodeVector(bytes)), [1, -2.5, Math.fround(0.1)]);
  assert.deepEqual(Array.from(decodeVector([0.5, 2])), [0.5, 2]);
  assert.deepEqual(encodeVector(new Float32Array([3])), new Uint8Array(new Float32Array([3]).buffer));
  // An unaligned view into a larger buffer decodes right.
  const padded = new Uint8Array(13);
  padded.set(bytes, 1);
  assert.deepEqual(Array.from(decodeVector(padded.subarray(1))), [1, -2.5, Math.fround(0.1)]);
});

test("bad vectors are refused with typed errors", () => {
  assert.throws(() => encodeVector("1,2"), ClientError);
  assert.throws(() => encodeVector([1, "x"]), ClientError);
  assert.throws(() => decodeVector(new Uint8Array(5)), ProtocolError);
  assert.throws(() => decodeVector(42), ProtocolError);
});

test("a request frame is one msgpack map with vectors as bin, undefined options left out", () => {
  const frame = encodeRequest(7, "query", { collection: "c", vector: [1, 2], k: undefined, docs: [{ id: "a", vector: [3], metadata: { vector: [1] } }] });
  const map = decodeFrame(frame);
  assert.equal(map.id, 7);
  assert.equal(map.op, "query");
  assert.ok(!("k" in map));
  assert.ok(map.vector instanceof Uint8Array && map.vector.byteLength === 8);
  assert.ok(map.docs[0].vector instanceof Uint8Array);
  assert.deepEqual(map.docs[0].metadata, { vector: [1] }); // metadata named "vector" is not a VECTOR
  assert.throws(() => encodeRequest(1, "ping", { id: 2 }), ClientError);
});

test("frames that are not a msgpack map are protocol errors", () => {
  assert.throws(() => decodeFrame("text"), ProtocolError);
  assert.throws(() => decodeFrame(encode([1, 2])), ProtocolError);
  assert.throws(() => decodeFrame(new Uint8Array([0xc1])), ProtocolError);
  const push = decodeVectors(decodeFrame(encode({ event: "topk", hits: [{ id: "a", vector: encodeVector([1]) }] })));
  assert.ok(push.hits[0].vector instanceof Float32Array);
});

test("camelCase options become the protocol's snake_case names, top level only", () => {
  assert.deepEqual(wireArgs({ ifNotExists: true, afterSeq: 3, whereText: { $contains: "x" }, where: { myField: 1 }, k: undefined }), {
    if_not_exists: true,
    after_seq: 3,
    where_text: { $contains: "x" },
    where: { myField: 1 },
  });
});

test("URLs: any ws/http base gives the WebSocket endpoint and the HTTP base", () => {
  assert.equal(wsUrl("http://127.0.0.1:8080"), "ws://127.0.0.1:8080/v1/ws");
  assert.equal(wsUrl("https://h.example/prefix/"), "wss://h.example/prefix/v1/ws");
  assert.equal(wsUrl("ws://h:1/v1/ws"), "ws://h:1/v1/ws");
  assert.equal(httpBase("ws://h:1/v1/ws"), "http://h:1");
  assert.equal(httpBase("wss://h/p/v1"), "https://h/p");
  assert.throws(() => wsUrl("ftp://h"), ClientError);
  assert.throws(() => httpBase("nonsense"), ClientError);
});

test("error maps become one class per code, carrying the code", () => {
  for (const [code, cls] of Object.entries(ERROR_CLASSES)) {
    const err = errorFromWire({ code, message: "m" });
    assert.ok(err instanceof cls && err instanceof ShoalError && err instanceof Error);
    assert.equal(err.code, code);
    assert.equal(err.serverMessage, "m");
  }
  const limited = errorFromWire({ code: "rate_limited", message: "slow down", retry_after_ms: 250 });
  assert.ok(limited instanceof RateLimited);
  assert.equal(limited.retryAfterMs, 250);
  assert.equal(new RateLimited("x").retryAfterMs, null);
  const unknown = errorFromWire({ code: "brand_new", message: "?" });
  assert.equal(unknown.constructor, ShoalError);
  assert.equal(unknown.code, "brand_new");
  assert.ok(errorFromWire("garbage") instanceof Internal);
  assert.ok(errorFromWire(null, 404) instanceof NotFound);
  assert.equal(new DimensionMismatch("d").code, "dimension_mismatch");
  assert.equal(new BadRequest("b").name, "BadRequest");
  assert.ok(new ConnectionClosed("gone", 1006).message.includes("1006"));
});

// Frames and vectors: one msgpack map per WebSocket frame, vectors as msgpack `bin` holding
// little-endian float32 (4 bytes a component; the compact form of the protocol).

import { Decoder, Encoder } from "@msgpack/msgpack";
import { ClientError, ProtocolError } from "./errors.js";

// ignoreUndefined: an option left undefined is not sent at all, so the server's default applies
// (the server rejects unknown arguments, and a nil is not "absent").
const encoder = new Encoder({ ignoreUndefined: true });
const decoder = new Decoder();

/**
 * The compact wire form of a vector: a Uint8Array of little-endian float32 values.
 * Accepts a Float32Array (or any typed array of numbers) or an array of numbers; a Uint8Array
 * is taken as already in wire form. NaN and Infinity are sent as they are (the server answers
 * invalid_vector). Throws ClientError for anything else.
 * @returns {Uint8Array}
 */
export function encodeVector(vector) {
  if (vector instanceof Uint8Array) return vector;
  if (!(Array.isArray(vector) || ArrayBuffer.isView(vector)) || vector instanceof DataView) {
    throw new ClientError("vector must be an array of numbers or a typed array");
  }
  const out = new Uint8Array(vector.length * 4);
  const view = new DataView(out.buffer);
  for (let i = 0; i < vector.length; i++) {
    const x = vector[i];
    if (typeof x !== "number" && typeof x !== "bigint") throw new ClientError(`vector[${i}] is not a number`);
    view.setFloat32(i * 4, Number(x), true);
  }
  return out;
}

/**
 * A vector as the server sends it (`bin` of float32 LE, or an array of numbers) as a fresh
 * Float32Array. Throws ProtocolError for anything else.
 * @returns {Float32Array}
 */
export function decodeVector(value) {
  if (value instanceof Uint8Array) {
    if (value.byteLength % 4) throw new ProtocolError(`vector bin of ${value.byteLength} bytes is not whole float32s`);
    const view = new DataView(value.buffer, value.byteOffset, value.byteLength);
    const out = new Float32Array(value.byteLength / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
    return out;
  }
  if (Array.isArray(value)) return Float32Array.from(value, Number);
  throw new ProtocolError(`vector of unexpected type ${typeof value}`);
}

/** Copy of request args with the top-level `vector`, every `docs[i].vector` and every
 * `queries[i].vector` in wire form (only those places hold a VECTOR; a metadata field named
 * `vector` is left alone). */
export function packArgs(args) {
  const out = { ...args };
  if (out.vector != null) out.vector = encodeVector(out.vector);
  for (const key of ["docs", "queries"]) {
    if (Array.isArray(out[key])) {
      out[key] = out[key].map((d) => (d && d.vector != null ? { ...d, vector: encodeVector(d.vector) } : d));
    }
  }
  return out;
}

/** The frame of one request: `{id, op, ...args}` with vectors as `bin`. Throws ClientError. */
export function encodeRequest(id, op, args) {
  if (args && ("id" in args || "op" in args)) throw new ClientError("request args must not contain 'id' or 'op'");
  try {
    return encoder.encode({ id, op, ...packArgs(args ?? {}) });
  } catch (err) {
    if (err instanceof ClientError) throw err;
    throw new ClientError(`cannot encode request: ${err.message}`);
  }
}

/** A received frame as a map. Throws ProtocolError for text frames and non-map payloads. */
export function decodeFrame(data) {
  if (typeof data === "string") throw new ProtocolError("text frame received; Shoal sends binary frames only");
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  let message;
  try {
    message = decoder.decode(bytes);
  } catch (err) {
    throw new ProtocolError(`frame is not valid msgpack: ${err.message}`);
  }
  if (!message || typeof message !== "object" || Array.isArray(message) || message instanceof Uint8Array) {
    throw new ProtocolError("frame is not a msgpack map");
  }
  return message;
}

/** A hit (or document) with its `vector`, when present, as a Float32Array. */
export function decodeHit(hit) {
  if (hit && typeof hit === "object" && hit.vector != null) return { ...hit, vector: decodeVector(hit.vector) };
  return hit;
}

/** A reply or push with every vector it holds (hits, docs, a topk list, a match's hit) decoded. */
export function decodeVectors(message) {
  const out = message;
  if (Array.isArray(out.hits)) out.hits = out.hits.map(decodeHit);
  if (Array.isArray(out.docs)) out.docs = out.docs.map(decodeHit);
  if (out.hit) out.hit = decodeHit(out.hit);
  if (Array.isArray(out.results)) out.results = out.results.map((r) => (r && !r.error ? decodeVectors(r) : r));
  return out;
}

/** camelCase option names as the protocol's snake_case (`ifNotExists` -> `if_not_exists`);
 * only top-level names, never the keys inside `where` or `metadata`. */
export function wireArgs(options) {
  const out = {};
  for (const [key, value] of Object.entries(options ?? {})) {
    if (value === undefined) continue;
    out[key.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase())] = value;
  }
  return out;
}

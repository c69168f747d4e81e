// The WebSocket client: one connection (subprotocol shoal.v1, binary frames of one msgpack map).
//
// Any number of requests can be in flight; each reply is matched to its request by id, in
// whatever order replies come. Pushes ({event, sub, ...}, no id) go to their subscription's
// bounded buffer as they arrive, so receiving never waits for a slow consumer: once a buffer is
// full the newest matches are dropped and the consumer reads one client-side `lagged` event,
// where the gap is, with the number lost.

import { decodeFrame, decodeVectors, encodeRequest, wireArgs } from "./codec.js";
import {
  ClientError,
  ConnectionClosed,
  NotFound,
  ProtocolError,
  RequestTimeout,
  TooLarge,
  errorFromResponse,
  errorFromWire,
} from "./errors.js";
import { wsUrl } from "./urls.js";

export const SUBPROTOCOL = "shoal.v1";
export const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
export const DEFAULT_CLOSE_TIMEOUT_MS = 2_000;
export const DEFAULT_QUEUE_SIZE = 10_000;
// The server's default frame limit: a larger request would be answered with close code 1009,
// failing every other request in flight, so it is refused here before anything is sent.
export const DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024;
// Replies are not bound by the server's frame limit (a `get` of many vectors can exceed it).
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

const OPEN = 1;

/** The WebSocket implementation: the caller's, the platform's, else the `ws` package (Node 20). */
async function webSocketImpl(given) {
  if (given) return { WebSocket: given, isWsPackage: false };
  if (typeof globalThis.WebSocket === "function") return { WebSocket: globalThis.WebSocket, isWsPackage: false };
  const module = await import("ws");
  return { WebSocket: module.WebSocket ?? module.default, isWsPackage: true };
}

/** Split per-call client options (timeoutMs) from the op's arguments. */
function splitOptions(options) {
  const { timeoutMs, ...rest } = options ?? {};
  return [rest, { timeoutMs }];
}

function includeList(args) {
  if (typeof args.include === "string") args.include = [args.include];
  return args;
}

/**
 * A standing query: an async iterator of the protocol's push maps (`{event: "match", sub, seq,
 * op, hit}`, `{event: "lagged", sub, dropped}`, `leave`, `topk`, ...), in the order they came.
 * An `ended` push (the server ended the subscription: `{event, sub, code, reason}`) is delivered
 * last, then iteration finishes. If the connection is lost, iteration throws ConnectionClosed
 * after the events already received: reconnect and subscribe with `afterSeq` = the last seq seen.
 * `unsubscribe()` (or `return()`, which `break` in `for await` calls) ends it.
 */
export class Subscription {
  constructor(client, sub, collection, queueSize) {
    this.sub = sub;
    this.collection = collection;
    /** Matches this client dropped because the consumer fell `queueSize` events behind. */
    this.dropped = 0;
    /** The `ended` push, once the server has ended this subscription. */
    this.ended = null;
    this._client = client;
    this._queueSize = queueSize;
    this._events = [];
    this._head = 0;
    this._waiters = [];
    this._finished = false;
    this._error = null;
    this._unsubscribed = false;
  }

  /** Events received and not yet consumed. */
  get pending() {
    return this._events.length - this._head;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  /** @returns {Promise<IteratorResult<object>>} */
  next() {
    if (this.pending) return Promise.resolve({ value: this._shift(), done: false });
    if (this._finished) return this._error ? Promise.reject(this._error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  /** Unsubscribe and finish the iteration (what `break` in `for await` calls). */
  async return() {
    await this.unsubscribe();
    return { value: undefined, done: true };
  }

  /** Unsubscribe (idempotent). Never throws for a subscription the server already ended or a
   * connection already closed; events not yet consumed are discarded. */
  async unsubscribe() {
    if (this._unsubscribed) return;
    this._unsubscribed = true;
    this._events = [];
    this._head = 0;
    this._finish(null);
    this._client._subs.delete(this.sub);
    if (this.ended || this._client.closed) return;
    try {
      await this._client.request("unsubscribe", { sub: this.sub });
    } catch (err) {
      if (!(err instanceof NotFound || err instanceof ConnectionClosed)) throw err;
    }
  }

  _shift() {
    const event = this._events[this._head];
    this._events[this._head++] = undefined;
    if (this._head > 1024 && this._head * 2 > this._events.length) {
      this._events = this._events.slice(this._head);
      this._head = 0;
    }
    return event;
  }

  _push(event) {
    if (this._finished) return;
    const waiter = this._waiters.shift();
    if (waiter) waiter.resolve({ value: event, done: false });
    else if (this.pending < this._queueSize || event.event === "ended") this._events.push(event);
    else this._overflow(event);
    if (event.event === "ended") {
      this.ended = event;
      this._client._subs.delete(this.sub);
      this._finish(null);
    }
  }

  /** The buffer is full: count the dropped event in a client-side `lagged` marker at the tail.
   * A top-k list is whole: the queued lists it supersedes are dropped instead, and it is kept. */
  _overflow(event) {
    if (event.event === "topk") {
      const kept = [];
      let lost = 0;
      for (let i = this._head; i < this._events.length; i++) {
        const queued = this._events[i];
        if (queued.event === "topk") lost += 1;
        else if (queued.event === "lagged") lost += queued.dropped ?? 0;
        else kept.push(queued);
      }
      this.dropped += lost;
      this._events = [...kept, { event: "lagged", sub: this.sub, dropped: lost, client: true }, event];
      this._head = 0;
      return;
    }
    if (event.event === "lagged") {
      this.dropped += event.dropped ?? 0;
    } else {
      this.dropped += 1;
    }
    const tail = this._events[this._events.length - 1];
    const lost = event.event === "lagged" ? (event.dropped ?? 0) : 1;
    if (tail && tail.event === "lagged" && tail.client) tail.dropped += lost;
    else this._events.push({ event: "lagged", sub: this.sub, dropped: lost, client: true });
  }

  _finish(error) {
    if (this._finished) return;
    this._finished = true;
    this._error = error;
    for (const waiter of this._waiters.splice(0)) {
      if (error) waiter.reject(error);
      else waiter.resolve({ value: undefined, done: true });
    }
  }
}

/** A WebSocket connection to a Shoal server. Open it with `await ShoalClient.connect(url)`. */
export class ShoalClient {
  /**
   * Connect to `url` (`ws://host:port/v1/ws`, or any ws(s):// / http(s):// base URL).
   * Options: `key` (sent as the first request, an `auth` op), `connectTimeoutMs` (handshake plus
   * auth; default 10 s), `timeoutMs` (default per-request timeout; none by default),
   * `queueSize` (events buffered per subscription, default 10,000), `maxRequestBytes` (16 MiB),
   * `closeTimeoutMs`, `WebSocket` (an implementation to use instead of the platform's); with the
   * `ws` package (Node 20) also `headers` (extra handshake headers) and `maxMessageBytes` (64 MiB).
   * Rejects with the server's ShoalError when it refuses the handshake (Node: its JSON body) or
   * the key, ConnectionClosed when it cannot be reached in time.
   * @returns {Promise<ShoalClient>}
   */
  static async connect(url, options = {}) {
    const endpoint = wsUrl(url);
    const connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    const { WebSocket, isWsPackage } = await webSocketImpl(options.WebSocket);
    const started = Date.now();
    const ws = await openSocket(WebSocket, isWsPackage, endpoint, connectTimeoutMs, options);
    const client = new ShoalClient(ws, endpoint, options);
    if (options.key) {
      const left = Math.max(1, connectTimeoutMs - (Date.now() - started));
      try {
        await client.auth(options.key, { timeoutMs: left });
      } catch (err) {
        await client.close();
        throw err;
      }
    }
    return client;
  }

  /** Wrap an open WebSocket; prefer `ShoalClient.connect`. */
  constructor(ws, url, options = {}) {
    this.url = url;
    this._ws = ws;
    this._nextId = 1;
    this._pending = new Map();
    this._subs = new Map();
    this._closedError = null;
    this._closing = null;
    this._timeoutMs = options.timeoutMs ?? null;
    this._queueSize = options.queueSize ?? DEFAULT_QUEUE_SIZE;
    this._maxRequestBytes = options.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES;
    this._closeTimeoutMs = options.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS;
    /** Called with each frame that belongs to no request or subscription (e.g. a bad_frame reply). */
    this.onunrouted = null;
    /** Called once with the ConnectionClosed error when the connection ends. */
    this.onclose = null;
    this._closed = new Promise((resolve) => {
      ws.onclose = (event) => {
        this._lost(new ConnectionClosed("connection closed by the server", event.code ?? null, event.reason ?? ""));
        resolve();
      };
    });
    ws.onerror = () => {}; // a close event follows; its code says more
    ws.onmessage = (event) => this._received(event.data);
  }

  /** True once the connection is closed (or closing). */
  get closed() {
    return this._closedError !== null;
  }

  /** Requests sent and not yet answered. */
  get inFlight() {
    return this._pending.size;
  }

  /**
   * Send `{op, ...args}` and resolve with the reply map (without id/ok). Vectors (Float32Array,
   * arrays) go out as float32 `bin`. Rejects with the ShoalError subclass of the reply's code,
   * ConnectionClosed if the connection ends first, RequestTimeout after `timeoutMs`, TooLarge if
   * the frame exceeds `maxRequestBytes` (nothing is sent), ClientError for unencodable args.
   */
  request(op, args = {}, { timeoutMs } = {}) {
    if (this._closedError) return Promise.reject(new ConnectionClosed(this._closedError.message));
    const id = this._nextId++;
    let frame;
    try {
      frame = encodeRequest(id, op, args);
    } catch (err) {
      return Promise.reject(err);
    }
    if (frame.byteLength > this._maxRequestBytes) {
      return Promise.reject(
        new TooLarge(`request frame of ${frame.byteLength} bytes exceeds maxRequestBytes=${this._maxRequestBytes} (checked by the client; split the batch)`, { size: frame.byteLength }),
      );
    }
    return new Promise((resolve, reject) => {
      const entry = { op, args, resolve, reject, timer: null, abandoned: false };
      const limit = timeoutMs ?? this._timeoutMs;
      if (limit != null) {
        entry.timer = setTimeout(() => {
          // The reply may still come: a late subscribe reply is then unsubscribed (see _reply).
          entry.abandoned = true;
          if (op !== "subscribe") this._pending.delete(id);
          reject(new RequestTimeout(`no reply to ${op} within ${limit} ms`));
        }, limit);
      }
      this._pending.set(id, entry);
      try {
        this._ws.send(frame);
      } catch (err) {
        this._pending.delete(id);
        clearTimeout(entry.timer);
        reject(new ConnectionClosed(`cannot send: ${err.message}`));
      }
    });
  }

  /** Close the connection (idempotent). Requests in flight reject with ConnectionClosed;
   * subscriptions throw it after their buffered events. Resolves once the socket is closed. */
  close() {
    if (!this._closing) {
      this._lost(new ConnectionClosed("connection closed by the client"));
      this._closing = (async () => {
        try {
          if (this._ws.readyState <= OPEN) this._ws.close(1000);
        } catch {
          // Already closing.
        }
        let timer;
        const timeout = new Promise((resolve) => (timer = setTimeout(resolve, this._closeTimeoutMs)));
        await Promise.race([this._closed, timeout]);
        clearTimeout(timer);
        if (typeof this._ws.terminate === "function" && this._ws.readyState !== 3) this._ws.terminate();
      })();
    }
    return this._closing;
  }

  // --- typed operations ------------------------------------------------------------------

  /** Resolves with {} when the server answers. */
  ping(options) {
    return this.request("ping", {}, options);
  }

  /** Present an API key on this connection (what `connect({key})` does). */
  auth(key, options) {
    return this.request("auth", { key }, options);
  }

  /** Create a collection; resolves with its shape {name, dim, metric, count, index?}.
   * Options: dim, metric, ifNotExists, index. Rejects with Exists unless ifNotExists. */
  async createCollection(name, options = {}) {
    const [args, call] = splitOptions(options);
    const reply = await this.request("create_collection", { name, ...wireArgs(args) }, call);
    return reply.collection;
  }

  /** Resolves with the list of collection shapes. */
  async listCollections(options) {
    return (await this.request("list_collections", {}, options)).collections;
  }

  /** Drop a collection; rejects with NotFound when there is none. */
  async dropCollection(name, options) {
    await this.request("drop_collection", { name }, options);
  }

  /** Insert or replace documents; resolves with {count, seq} once committed and visible. */
  upsert(collection, docs, options) {
    return this.request("upsert", { collection, docs }, options);
  }

  /** Delete by ids (an array) or by {ids} / {where, whereText}; resolves with {deleted, seq}. */
  delete(collection, idsOrFilter = {}, options = {}) {
    const merged = Array.isArray(idsOrFilter) ? { ...options, ids: idsOrFilter } : idsOrFilter;
    const [args, call] = splitOptions(merged);
    return this.request("delete", { collection, ...wireArgs(args) }, call);
  }

  /** Documents by ids (an array), or a page by {where, limit, cursor, include}; resolves with
   * {docs, next_cursor?}. Missing ids are left out; vectors come back as Float32Array. */
  get(collection, idsOrOptions = {}, options = {}) {
    const merged = Array.isArray(idsOrOptions) ? { ...options, ids: idsOrOptions } : idsOrOptions;
    const [args, call] = splitOptions(merged);
    return this.request("get", { collection, ...includeList(wireArgs(args)) }, call);
  }

  /** Resolves with the number of live documents. */
  async count(collection, options) {
    return (await this.request("count", { collection }, options)).count;
  }

  /** Search: options {text | vector | like, k, where, whereText, mode, fusion, alpha, include,
   * ef, minSeq, timeoutMs, ...}; resolves with {hits, took_ms, cached}. */
  query(collection, options = {}) {
    const [args, call] = splitOptions(options);
    return this.request("query", { collection, ...includeList(wireArgs(args)) }, call);
  }

  /** Several queries of one collection in one request: `queries` is an array of `query`
   * options (without timeoutMs). Resolves with an array, in order, of each query's
   * {hits, took_ms, cached} or of the error it alone met (a ShoalError instance); a bad argument
   * rejects the whole call, naming the query (`queries[3]: ...`). */
  async queryBatch(collection, queries, options = {}) {
    const items = queries.map((q) => includeList(wireArgs(q)));
    const reply = await this.request("query_batch", { collection, queries: items }, options);
    if (!Array.isArray(reply.results)) throw new ProtocolError("query_batch reply without a results list");
    return reply.results.map((r) => (r.error ? errorFromWire(r.error) : { ...r, took_ms: reply.took_ms }));
  }

  /**
   * Start a standing query: options {text | vector | like, threshold | k, where, whereText,
   * include, afterSeq}. Resolves with a Subscription (async iterator of push maps) once the
   * server has answered; pushes that follow the reply are kept, never lost. `afterSeq` replays
   * the matches of later changes from the durable log first.
   * @returns {Promise<Subscription>}
   */
  subscribe(collection, options = {}) {
    const [args, call] = splitOptions(options);
    return this.request("subscribe", { collection, ...includeList(wireArgs(args)) }, call);
  }

  /** Unsubscribe by Subscription or sub id. */
  async unsubscribe(sub) {
    if (sub instanceof Subscription) return sub.unsubscribe();
    const known = this._subs.get(sub);
    if (known) return known.unsubscribe();
    await this.request("unsubscribe", { sub });
  }

  // --- what the connection delivers ------------------------------------------------------

  _received(data) {
    let message;
    try {
      message = decodeFrame(data);
    } catch (err) {
      this._unrouted(err);
      return;
    }
    // A push has `event` and no `ok` (a `leave` push carries the document's `id`).
    if (typeof message.event === "string" && message.ok === undefined) this._pushed(message);
    else if (message.id !== undefined && message.id !== null) this._reply(message);
    else this._unrouted(message.ok === false ? errorFromWire(message.error) : new ProtocolError("frame with neither id nor event"));
  }

  _reply(message) {
    const entry = this._pending.get(message.id);
    if (!entry) {
      this._unrouted(new ProtocolError(`reply to unknown request id ${message.id}`));
      return;
    }
    this._pending.delete(message.id);
    clearTimeout(entry.timer);
    if (message.ok !== true) {
      entry.reject(errorFromWire(message.error));
      return;
    }
    const { id: _id, ok: _ok, ...result } = message;
    if (entry.op === "subscribe") {
      if (typeof result.sub !== "string") {
        entry.reject(new ProtocolError("subscribe reply without a sub id"));
        return;
      }
      // Registered here, synchronously, so the pushes that follow the reply find it.
      const subscription = new Subscription(this, result.sub, entry.args.collection, this._queueSize);
      this._subs.set(result.sub, subscription);
      if (entry.abandoned) subscription.unsubscribe().catch(() => {});
      else entry.resolve(subscription);
      return;
    }
    entry.resolve(decodeVectors(result));
  }

  _pushed(message) {
    const subscription = this._subs.get(message.sub);
    if (!subscription) return; // unsubscribed here: late pushes are of no interest
    let event = message;
    try {
      event = decodeVectors(message);
    } catch (err) {
      this._unrouted(err);
      return;
    }
    subscription._push(event);
  }

  _unrouted(what) {
    if (typeof this.onunrouted === "function") this.onunrouted(what);
  }

  _lost(error) {
    if (this._closedError) return;
    this._closedError = error;
    for (const entry of this._pending.values()) {
      clearTimeout(entry.timer);
      if (!entry.abandoned) entry.reject(new ConnectionClosed(error.message, error.closeCode, error.reason));
    }
    this._pending.clear();
    for (const subscription of this._subs.values()) {
      subscription._finish(new ConnectionClosed(error.message, error.closeCode, error.reason));
    }
    this._subs.clear();
    if (typeof this.onclose === "function") this.onclose(error);
  }
}

/** Open the socket, subprotocol required; reject with a typed error on refusal or timeout. */
function openSocket(WebSocket, isWsPackage, url, timeoutMs, options) {
  return new Promise((resolve, reject) => {
    let settled = false;
    const ws = isWsPackage
      ? new WebSocket(url, [SUBPROTOCOL], { maxPayload: options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES, headers: options.headers })
      : new WebSocket(url, [SUBPROTOCOL]);
    ws.binaryType = "arraybuffer";
    const fail = (error) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      try {
        if (typeof ws.terminate === "function") ws.terminate();
        else ws.close();
      } catch {
        // Never opened.
      }
      reject(error);
    };
    const timer = setTimeout(() => fail(new ConnectionClosed(`cannot connect to ${url}: timed out after ${timeoutMs} ms`)), timeoutMs);
    if (isWsPackage) {
      // Node: a refused handshake carries the server's JSON error body; browsers hide it.
      ws.on("unexpected-response", (_request, response) => {
        const chunks = [];
        response.on("data", (chunk) => chunks.push(chunk));
        response.on("end", async () => {
          const body = Buffer.concat(chunks).toString("utf8");
          const headers = { "content-type": response.headers["content-type"] ?? "" };
          fail(await errorFromResponse(new Response(body, { status: response.statusCode, headers })));
        });
        response.on("error", () => fail(new ConnectionClosed(`handshake to ${url} refused with HTTP ${response.statusCode}`)));
      });
    }
    ws.onopen = () => {
      if (settled) return;
      if (ws.protocol !== SUBPROTOCOL) {
        fail(new ClientError(`server did not accept subprotocol ${SUBPROTOCOL}`));
        return;
      }
      settled = true;
      clearTimeout(timer);
      resolve(ws);
    };
    ws.onerror = (event) => fail(new ConnectionClosed(`cannot connect to ${url}${event && event.message ? ": " + event.message : ""}`));
    ws.onclose = (event) => fail(new ConnectionClosed(`cannot connect to ${url}`, event.code ?? null, event.reason ?? ""));
  });
}

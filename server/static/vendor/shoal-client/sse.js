// Server-Sent Events helpers: standing queries and change feeds over plain HTTP.
//
// Both helpers return an EventStream: an async iterator of {id, event, data} (`data` is the
// event's parsed JSON; `id` its seq as sent). In browsers it rides on EventSource (which resumes
// with Last-Event-ID by itself); elsewhere (Node 20) it reads the text/event-stream of a fetch
// with the small parser below, sending Last-Event-ID on each reconnect. With `reconnect: true`
// a dropped stream (a transport failure, a `lagged` close, a stream end) is resumed after the
// server's `retry:` interval, so no match is lost or duplicated; otherwise it ends the iteration.

import { ClientError, ConnectionClosed, ProtocolError, errorFromResponse, errorFromStatus, errorFromWire } from "./errors.js";
import { httpBase } from "./urls.js";

export const DEFAULT_RETRY_MS = 2000;
// The server sends a comment at least every 15 s; a read silent for much longer means a dead peer.
export const DEFAULT_READ_TIMEOUT_MS = 45_000;

const SUBSCRIBE_EVENTS = ["match", "leave", "topk", "lagged", "error"];
const CHANGES_EVENTS = ["upsert", "delete", "lagged", "error"];

/**
 * Incremental parser of a text/event-stream (the WHATWG rules): feed it decoded text as it
 * arrives, in chunks of any size; it returns the events completed so far as {id, event, data}.
 * `id` is the last event id seen (it persists across events, as the standard says); `retry`
 * holds the last valid `retry:` value in ms (null before one).
 */
export class SSEParser {
  constructor() {
    this.retry = null;
    this.lastEventId = "";
    this._buffer = "";
    this._data = [];
    this._event = "";
    this._started = false;
  }

  /** @param {string} text @returns {{id: string, event: string, data: string}[]} */
  feed(text) {
    let buffer = this._buffer + text;
    if (!this._started && buffer.length) {
      this._started = true;
      if (buffer.charCodeAt(0) === 0xfeff) buffer = buffer.slice(1);
    }
    const events = [];
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      // A CR at the very end may be the first half of CRLF: wait for the next chunk.
      if (c === 13 && i === buffer.length - 1) break;
      this._line(buffer.slice(start, i), events);
      if (c === 13 && buffer.charCodeAt(i + 1) === 10) i++;
      start = i + 1;
    }
    this._buffer = buffer.slice(start);
    return events;
  }

  _line(line, events) {
    if (line === "") {
      if (this._data.length) {
        events.push({ id: this.lastEventId, event: this._event || "message", data: this._data.join("\n") });
      }
      this._data = [];
      this._event = "";
      return;
    }
    if (line.charCodeAt(0) === 58) return; // ":" comment (the server's heartbeat)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (field === "data") this._data.push(value);
    else if (field === "event") this._event = value;
    else if (field === "id") {
      if (!value.includes("\0")) this.lastEventId = value;
    } else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }
}

/**
 * An open event stream: `for await (const {id, event, data} of stream)`. `close()` (or `break`)
 * ends it. `lastEventId` is the id of the last event delivered: pass it as `lastEventId` to a
 * new stream to resume after it.
 */
export class EventStream {
  constructor(produce) {
    this._abort = new AbortController();
    this._state = { lastId: null, retryMs: DEFAULT_RETRY_MS };
    this._gen = produce(this._abort.signal, this._state);
  }

  get lastEventId() {
    return this._state.lastId;
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  next() {
    return this._gen.next();
  }

  async return() {
    this._abort.abort();
    return this._gen.return(undefined);
  }

  /** End the stream (idempotent); a pending `next()` resolves as done. */
  close() {
    this._abort.abort();
    this._gen.return(undefined).catch(() => {});
  }
}

function vectorParam(vector) {
  if (typeof vector === "string") return vector;
  return Array.from(vector, (x) => String(Number(x))).join(",");
}

/** The query parameters of GET /v1/collections/{name}/subscribe. */
export function subscribeParams(options) {
  const params = new URLSearchParams();
  if (options.text != null) params.set("text", options.text);
  if (options.vector != null) params.set("vector", vectorParam(options.vector));
  if (options.like != null) params.set("like", options.like);
  if (options.threshold != null) params.set("threshold", String(options.threshold));
  if (options.k != null) params.set("k", String(options.k));
  if (options.where != null) params.set("where", JSON.stringify(options.where));
  const whereText = options.whereText ?? options.where_text;
  if (whereText != null) params.set("where_text", JSON.stringify(whereText));
  if (options.include != null) params.set("include", [].concat(options.include).join(","));
  return params;
}

/**
 * Match events of a standing query (`event` is `match`, `leave`, `topk` or `lagged`; a match's
 * `data` is {seq, op, hit}). Options: text | vector | like, threshold | k, where, whereText,
 * include, and the stream options of `changesSSE`.
 * Iteration throws the ShoalError of the server's refusal (e.g. BadRequest, NotFound) before
 * any event, or of an `event: error` block (NotFound when the collection is dropped, Unavailable
 * when the server stops); ConnectionClosed on a transport failure unless `reconnect`.
 * @returns {EventStream}
 */
export function subscribeSSE(baseUrl, collection, options = {}) {
  const url = `${httpBase(baseUrl)}/v1/collections/${encodeURIComponent(collection)}/subscribe`;
  return openStream(url, subscribeParams(options), SUBSCRIBE_EVENTS, options);
}

/**
 * Every applied change of `collection` (`event` is `upsert` or `delete`; `data` is
 * {op, seq, first_seq, ids}). Stream options: lastEventId (resume after this seq), key (API
 * key; sent as `Authorization` with fetch, as the `key` parameter with EventSource), reconnect
 * (default false), readTimeoutMs (fetch only, default 45 s), transport ("eventsource" |
 * "fetch"; default EventSource where the platform has it), fetch (an implementation), onopen
 * (called each time the stream is accepted: from then on, no change is missed). A stream opens
 * on the first `next()`.
 * @returns {EventStream}
 */
export function changesSSE(baseUrl, collection, options = {}) {
  const url = `${httpBase(baseUrl)}/v1/collections/${encodeURIComponent(collection)}/changes`;
  return openStream(url, new URLSearchParams(), CHANGES_EVENTS, options);
}

function openStream(url, params, kinds, options) {
  const transport = options.transport ?? (typeof globalThis.EventSource === "function" ? "eventsource" : "fetch");
  if (transport !== "fetch" && transport !== "eventsource") throw new ClientError(`unknown SSE transport ${transport}`);
  const produce = transport === "fetch" ? fetchEvents : eventSourceEvents;
  return new EventStream((signal, state) => {
    if (options.lastEventId != null) state.lastId = String(options.lastEventId);
    return produce(url, params, kinds, options, signal, state);
  });
}

/** One parsed event, or the error an `event: error` block stands for. */
function toEvent(raw) {
  let data;
  try {
    data = JSON.parse(raw.data);
  } catch (err) {
    throw new ProtocolError(`event data is not JSON: ${err.message}`);
  }
  if (!data || typeof data !== "object" || Array.isArray(data)) throw new ProtocolError("event data is not an object");
  if (raw.event === "error") throw errorFromWire(data.error ?? data);
  return { id: raw.id || null, event: raw.event, data };
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
}

async function* fetchEvents(url, params, _kinds, options, signal, state) {
  const fetchImpl = options.fetch ?? globalThis.fetch;
  if (typeof fetchImpl !== "function") throw new ClientError("no fetch implementation: pass options.fetch");
  const readTimeoutMs = options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT_MS;
  const query = params.toString();
  const target = query ? `${url}?${query}` : url;
  while (!signal.aborted) {
    const attempt = new AbortController();
    const stop = () => attempt.abort();
    signal.addEventListener("abort", stop);
    const headers = { Accept: "text/event-stream" };
    if (options.key) headers.Authorization = `Bearer ${options.key}`;
    if (state.lastId) headers["Last-Event-ID"] = state.lastId;
    let timer = null;
    let reader = null;
    try {
      let response;
      try {
        response = await fetchImpl(target, { headers, signal: attempt.signal, cache: "no-store" });
      } catch (err) {
        if (signal.aborted) return;
        throw new ConnectionClosed(`event stream ${url} failed: ${err.message}`);
      }
      if (response.status !== 200) throw await errorFromResponse(response);
      const type = response.headers.get("content-type") ?? "";
      if (!type.startsWith("text/event-stream")) throw new ProtocolError(`expected text/event-stream, got ${type || "no content type"}`);
      if (typeof options.onopen === "function") options.onopen();
      const parser = new SSEParser();
      const decoder = new TextDecoder();
      reader = response.body.getReader();
      for (;;) {
        clearTimeout(timer);
        timer = setTimeout(() => attempt.abort(), readTimeoutMs);
        let chunk;
        try {
          chunk = await reader.read();
        } catch (err) {
          if (signal.aborted) return;
          throw new ConnectionClosed(`event stream ${url} failed: ${attempt.signal.aborted ? "no data for " + readTimeoutMs + " ms" : err.message}`);
        }
        clearTimeout(timer); // not while the consumer holds an event: only a silent peer counts
        if (chunk.done) break;
        for (const raw of parser.feed(decoder.decode(chunk.value, { stream: true }))) {
          if (parser.retry !== null) state.retryMs = parser.retry;
          const event = toEvent(raw);
          if (event.id) state.lastId = event.id;
          yield event;
        }
      }
    } catch (err) {
      if (!(err instanceof ConnectionClosed) || !options.reconnect) throw err;
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", stop);
      if (reader) reader.cancel().catch(() => {});
      attempt.abort();
    }
    if (!options.reconnect) return;
    await sleep(state.retryMs, signal);
  }
}

async function* eventSourceEvents(url, params, kinds, options, signal, state) {
  const query = new URLSearchParams(params);
  if (options.key) query.set("key", options.key); // EventSource cannot send Authorization
  if (state.lastId) query.set("last_event_id", state.lastId);
  const target = `${url}?${query}`;
  const source = new globalThis.EventSource(target);
  const queue = [];
  let wake = null;
  const put = (item) => {
    queue.push(item);
    if (wake) wake();
  };
  for (const kind of kinds) {
    source.addEventListener(kind, (ev) => {
      if (typeof ev.data === "string") put({ raw: { id: ev.lastEventId, event: kind, data: ev.data } });
      else if (kind === "error") put({ failure: source.readyState }); // the connection, not the server
    });
  }
  if (typeof options.onopen === "function") source.addEventListener("open", () => options.onopen());
  const stop = () => put({ stop: true });
  signal.addEventListener("abort", stop);
  try {
    for (;;) {
      if (!queue.length) await new Promise((resolve) => (wake = resolve));
      wake = null;
      const item = queue.shift();
      if (item.stop) return;
      if (item.raw) {
        const event = toEvent(item.raw);
        if (event.id) state.lastId = event.id;
        yield event;
        continue;
      }
      if (item.failure === 2 /* CLOSED: refused, EventSource gives up */) {
        throw await refusal(target);
      }
      // CONNECTING: EventSource is reconnecting by itself, with Last-Event-ID.
      if (!options.reconnect) return;
    }
  } finally {
    signal.removeEventListener("abort", stop);
    source.close();
  }
}

/** Why a refused EventSource was refused: EventSource hides the answer, HEAD runs the same checks. */
async function refusal(target) {
  try {
    const response = await fetch(target, { method: "HEAD", cache: "no-store" });
    if (response.status !== 200) return errorFromStatus(response.status, `event stream refused with HTTP ${response.status}`);
  } catch {
    // Unreachable: fall through.
  }
  return new ConnectionClosed(`event stream ${target} failed`);
}

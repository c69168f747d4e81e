// shoal-client: the JavaScript client of Shoal, for browsers and Node 20+.
//
//   import { ShoalClient, NotFound } from "shoal-client";
//   const db = await ShoalClient.connect("ws://127.0.0.1:8080/v1/ws");
//   await db.createCollection("docs", { ifNotExists: true });
//   await db.upsert("docs", [{ id: "a", text: "hello world" }]);
//   const { hits } = await db.query("docs", { text: "greeting", k: 5 });
//   const sub = await db.subscribe("docs", { text: "greeting", threshold: 0.5 });
//   for await (const push of sub) { ... }   // {event: "match", sub, seq, op, hit}
//   await db.close();

export {
  ShoalClient,
  Subscription,
  SUBPROTOCOL,
  DEFAULT_CONNECT_TIMEOUT_MS,
  DEFAULT_QUEUE_SIZE,
  DEFAULT_MAX_REQUEST_BYTES,
} from "./client.js";
export { subscribeSSE, changesSSE, EventStream, SSEParser, subscribeParams } from "./sse.js";
export { encodeVector, decodeVector } from "./codec.js";
export { wsUrl, httpBase } from "./urls.js";
export {
  ShoalError,
  BadFrame,
  BadRequest,
  UnknownOp,
  NotFound,
  Exists,
  DimensionMismatch,
  InvalidVector,
  TooLarge,
  Unauthorized,
  Forbidden,
  RateLimited,
  Unavailable,
  Overloaded,
  Internal,
  MethodNotAllowed,
  Gone,
  ERROR_CLASSES,
  ClientError,
  ConnectionClosed,
  RequestTimeout,
  ProtocolError,
  errorFromWire,
} from "./errors.js";

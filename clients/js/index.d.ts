// Type declarations of shoal-client: the whole public API of src/index.js.

export type Vector = Float32Array | ArrayLike<number> | Uint8Array;
export type MetadataValue = string | number | boolean | string[];
export type Metadata = Record<string, MetadataValue>;
export type Filter = Record<string, unknown>;
export type TextFilter = { $contains: string } | { $not_contains: string };
export type IncludeField = "text" | "metadata" | "vector";
export type Metric = "cosine" | "l2" | "ip" | "l1";

export interface Document {
  id: string;
  text?: string;
  vector?: Vector;
  metadata?: Metadata;
}

/** A document or hit as the server sends it; vectors decoded as Float32Array. */
export interface StoredDocument {
  id: string;
  text?: string;
  metadata?: Metadata;
  vector?: Float32Array;
}

export interface Hit extends StoredDocument {
  score: number;
  distance: number | null;
  scores?: { vector: number | null; keyword: number | null };
}

export interface CollectionInfo {
  name: string;
  dim: number;
  metric: Metric | string;
  count: number;
  index?: { kind: string; [param: string]: unknown };
}

export interface QueryResult {
  hits: Hit[];
  took_ms: number;
  cached?: boolean;
}

export interface UpsertResult {
  count: number;
  seq: number;
}

export interface DeleteResult {
  deleted: number;
  seq: number;
}

export interface GetResult {
  docs: StoredDocument[];
  next_cursor?: string | null;
}

/** Per-call options of every request. */
export interface CallOptions {
  /** Reject with RequestTimeout when no reply came within this many ms. */
  timeoutMs?: number;
}

export interface ConnectOptions {
  /** API key, presented with an `auth` request right after the handshake. */
  key?: string;
  /** Handshake plus auth (default 10,000). */
  connectTimeoutMs?: number;
  /** Default per-request timeout (default: none). */
  timeoutMs?: number;
  /** Events buffered per subscription before the newest are dropped (default 10,000). */
  queueSize?: number;
  /** Largest request frame sent (default 16 MiB); a larger one rejects with TooLarge. */
  maxRequestBytes?: number;
  /** With the `ws` package (Node 20): the largest message received (default 64 MiB). */
  maxMessageBytes?: number;
  /** With the `ws` package (Node 20): extra handshake headers. */
  headers?: Record<string, string>;
  /** How long close() waits for the server's close (default 2,000). */
  closeTimeoutMs?: number;
  /** A WebSocket implementation to use instead of the platform's. */
  WebSocket?: unknown;
}

export interface SearchSource {
  text?: string;
  vector?: Vector;
  /** A stored document's id: its vector is the query, and it is left out of the hits. */
  like?: string;
}

export interface QueryOptions extends SearchSource, CallOptions {
  k?: number;
  where?: Filter;
  whereText?: TextFilter;
  mode?: "vector" | "keyword" | "hybrid";
  fusion?: "rrf" | "weighted";
  alpha?: number;
  rrfK?: number;
  include?: IncludeField | IncludeField[];
  ef?: number;
  nprobe?: number;
  minSeq?: number;
  [option: string]: unknown;
}

export interface SubscribeOptions extends SearchSource, CallOptions {
  /** Minimum score of a match (a threshold subscription). */
  threshold?: number;
  /** A top-k subscription instead of a threshold. */
  k?: number;
  where?: Filter;
  whereText?: TextFilter;
  include?: IncludeField | IncludeField[];
  /** Replay the matches of changes after this seq from the durable log first. */
  afterSeq?: number;
  [option: string]: unknown;
}

export interface CreateCollectionOptions extends CallOptions {
  dim?: number;
  metric?: Metric;
  ifNotExists?: boolean;
  index?: { kind: string; [param: string]: unknown };
}

export interface DeleteOptions extends CallOptions {
  ids?: string[];
  where?: Filter;
  whereText?: TextFilter;
}

/** By `ids`, or a page: `where` / `whereText`, `limit` and the `cursor` a previous page answered
 * as `next_cursor` (ids with any of those is a BadRequest). */
export interface GetOptions extends CallOptions {
  ids?: string[];
  where?: Filter;
  whereText?: TextFilter;
  limit?: number;
  cursor?: string;
  include?: IncludeField | IncludeField[];
}

export interface MatchPush {
  event: "match";
  sub: string;
  seq: number;
  op: "upsert";
  hit: Hit;
}

export interface LaggedPush {
  event: "lagged";
  sub: string;
  dropped: number;
  /** True when this client dropped the events (its queueSize), not the server. */
  client?: boolean;
}

export interface LeavePush {
  event: "leave";
  sub: string;
  seq: number;
  id: string;
}

export interface TopKPush {
  event: "topk";
  sub: string;
  seq: number;
  hits: Hit[];
}

export interface EndedPush {
  event: "ended";
  sub: string;
  code: string;
  reason: string;
}

export type Push = MatchPush | LaggedPush | LeavePush | TopKPush | EndedPush;

export declare const SUBPROTOCOL: "shoal.v1";
export declare const DEFAULT_CONNECT_TIMEOUT_MS: number;
export declare const DEFAULT_QUEUE_SIZE: number;
export declare const DEFAULT_MAX_REQUEST_BYTES: number;

export declare class Subscription implements AsyncIterableIterator<Push> {
  readonly sub: string;
  readonly collection: string;
  /** Matches this client dropped because the consumer fell queueSize events behind. */
  readonly dropped: number;
  /** The `ended` push, once the server has ended this subscription. */
  readonly ended: EndedPush | null;
  /** Events received and not yet consumed. */
  readonly pending: number;
  [Symbol.asyncIterator](): Subscription;
  next(): Promise<IteratorResult<Push, undefined>>;
  return(): Promise<IteratorResult<Push, undefined>>;
  unsubscribe(): Promise<void>;
}

export declare class ShoalClient {
  static connect(url: string, options?: ConnectOptions): Promise<ShoalClient>;
  readonly url: string;
  readonly closed: boolean;
  readonly inFlight: number;
  onunrouted: ((what: unknown) => void) | null;
  onclose: ((error: ConnectionClosed) => void) | null;
  request(op: string, args?: Record<string, unknown>, options?: CallOptions): Promise<Record<string, any>>;
  close(): Promise<void>;
  ping(options?: CallOptions): Promise<Record<string, never>>;
  auth(key: string, options?: CallOptions): Promise<Record<string, never>>;
  createCollection(name: string, options?: CreateCollectionOptions): Promise<CollectionInfo>;
  listCollections(options?: CallOptions): Promise<CollectionInfo[]>;
  dropCollection(name: string, options?: CallOptions): Promise<void>;
  upsert(collection: string, docs: Document[], options?: CallOptions): Promise<UpsertResult>;
  delete(collection: string, ids: string[], options?: CallOptions): Promise<DeleteResult>;
  delete(collection: string, filter: DeleteOptions): Promise<DeleteResult>;
  get(collection: string, ids: string[], options?: GetOptions): Promise<GetResult>;
  get(collection: string, options: GetOptions): Promise<GetResult>;
  count(collection: string, options?: CallOptions): Promise<number>;
  query(collection: string, options: QueryOptions): Promise<QueryResult>;
  /** Several queries in one request: each query's result, or the error it alone met. */
  queryBatch(
    collection: string,
    queries: Omit<QueryOptions, "timeoutMs">[],
    options?: CallOptions,
  ): Promise<(QueryResult | ShoalError)[]>;
  subscribe(collection: string, options: SubscribeOptions): Promise<Subscription>;
  unsubscribe(sub: Subscription | string): Promise<void>;
}

export interface SSEEvent<D = Record<string, any>> {
  /** The event's seq as sent (null when the event has none, e.g. lagged). */
  id: string | null;
  event: string;
  data: D;
}

export interface StreamOptions {
  /** Resume after this seq. */
  lastEventId?: string | number;
  /** API key: `Authorization` with fetch, the `key` parameter with EventSource. */
  key?: string;
  /** Resume by itself after a dropped stream (default false: the iteration ends). */
  reconnect?: boolean;
  /** fetch transport: a read silent this long counts as a dead peer (default 45,000). */
  readTimeoutMs?: number;
  /** Default: "eventsource" where the platform has EventSource, else "fetch". */
  transport?: "eventsource" | "fetch";
  fetch?: typeof fetch;
  /** Called each time the server accepts the stream (it opens on the first next()). */
  onopen?: () => void;
}

export interface SubscribeSSEOptions extends SearchSource, StreamOptions {
  threshold?: number;
  k?: number;
  where?: Filter;
  whereText?: TextFilter;
  include?: IncludeField | IncludeField[];
}

export declare class EventStream implements AsyncIterableIterator<SSEEvent> {
  readonly lastEventId: string | null;
  [Symbol.asyncIterator](): EventStream;
  next(): Promise<IteratorResult<SSEEvent, undefined>>;
  return(): Promise<IteratorResult<SSEEvent, undefined>>;
  close(): void;
}

export declare function subscribeSSE(baseUrl: string, collection: string, options?: SubscribeSSEOptions): EventStream;
export declare function changesSSE(baseUrl: string, collection: string, options?: StreamOptions): EventStream;
export declare function subscribeParams(options: SubscribeSSEOptions): URLSearchParams;

export declare class SSEParser {
  retry: number | null;
  lastEventId: string;
  feed(text: string): { id: string; event: string; data: string }[];
}

export declare function encodeVector(vector: Vector): Uint8Array;
export declare function decodeVector(value: Uint8Array | number[]): Float32Array;
export declare function wsUrl(url: string): string;
export declare function httpBase(url: string): string;

export declare class ShoalError extends Error {
  constructor(code: string, message: string, extra?: Record<string, unknown>);
  readonly code: string;
  /** The server's message (`message` is "code: message"). */
  readonly serverMessage: string;
  /** Further fields of the error map (e.g. retry_after_ms). */
  readonly extra: Record<string, unknown>;
}

interface ShoalErrorClass<C extends string> {
  new (message?: string, extra?: Record<string, unknown>): ShoalError & { readonly code: C };
  readonly code: C;
  readonly httpStatus: number;
}

export declare const BadFrame: ShoalErrorClass<"bad_frame">;
export declare const BadRequest: ShoalErrorClass<"bad_request">;
export declare const UnknownOp: ShoalErrorClass<"unknown_op">;
export declare const NotFound: ShoalErrorClass<"not_found">;
export declare const Exists: ShoalErrorClass<"exists">;
export declare const DimensionMismatch: ShoalErrorClass<"dimension_mismatch">;
export declare const InvalidVector: ShoalErrorClass<"invalid_vector">;
export declare const TooLarge: ShoalErrorClass<"too_large">;
export declare const Unauthorized: ShoalErrorClass<"unauthorized">;
export declare const Forbidden: ShoalErrorClass<"forbidden">;
export declare const Unavailable: ShoalErrorClass<"unavailable">;
export declare const Overloaded: ShoalErrorClass<"overloaded">;
export declare const Internal: ShoalErrorClass<"internal">;
export declare const MethodNotAllowed: ShoalErrorClass<"method_not_allowed">;
/** The resume point (after_seq / Last-Event-ID) predates the compacted log: subscribe again without one. */
export declare const Gone: ShoalErrorClass<"gone">;

export declare class RateLimited extends ShoalError {
  constructor(message?: string, extra?: Record<string, unknown>);
  readonly code: "rate_limited";
  static readonly code: "rate_limited";
  static readonly httpStatus: number;
  /** How long the server asks the caller to wait before retrying, in ms (null when unsaid). */
  readonly retryAfterMs: number | null;
}

export declare const ERROR_CLASSES: Readonly<Record<string, ShoalErrorClass<string> | typeof RateLimited>>;

export declare class ClientError extends Error {
  constructor(message: string);
}

export declare class ConnectionClosed extends ClientError {
  constructor(message?: string, closeCode?: number | null, reason?: string);
  readonly closeCode: number | null;
  readonly reason: string;
}

export declare class RequestTimeout extends ClientError {}
export declare class ProtocolError extends ClientError {}

export declare function errorFromWire(body: unknown, httpStatus?: number | null): ShoalError;

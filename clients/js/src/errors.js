// Errors the Shoal client throws.
//
// Two families, kept apart on purpose:
// - ShoalError: the server answered and said no. It carries the wire `code`, the server's
//   `message` and any further fields of the error map in `extra` (e.g. retry_after_ms). One
//   subclass per code of the protocol, so callers can test `err instanceof NotFound` (or
//   `err.code === "not_found"`). A code this client does not know becomes a plain ShoalError.
// - ClientError: nothing usable came back: the connection is gone (ConnectionClosed), no answer
//   in time (RequestTimeout), the server broke the protocol (ProtocolError), or a misuse.

export class ShoalError extends Error {
  /**
   * @param {string} code the stable wire code
   * @param {string} message for humans
   * @param {Record<string, unknown>} [extra] further fields of the error map
   */
  constructor(code, message, extra = {}) {
    super(`${code}: ${message}`);
    this.name = new.target.name;
    this.code = code;
    this.serverMessage = message;
    this.extra = { ...extra };
  }
}

/** Subclass factory: one class per wire code, with its HTTP status. */
function codeClass(name, code, httpStatus) {
  const cls = {
    [name]: class extends ShoalError {
      /**
       * @param {string} [message] the server's message
       * @param {Record<string, unknown>} [extra] further fields of the error map
       */
      constructor(message = "", extra = {}) {
        super(code, message, extra);
      }
    },
  }[name];
  cls.code = code;
  cls.httpStatus = httpStatus;
  return cls;
}

export const BadFrame = codeClass("BadFrame", "bad_frame", 400);
export const BadRequest = codeClass("BadRequest", "bad_request", 400);
export const UnknownOp = codeClass("UnknownOp", "unknown_op", 400);
export const NotFound = codeClass("NotFound", "not_found", 404);
export const Exists = codeClass("Exists", "exists", 409);
export const DimensionMismatch = codeClass("DimensionMismatch", "dimension_mismatch", 422);
export const InvalidVector = codeClass("InvalidVector", "invalid_vector", 422);
export const TooLarge = codeClass("TooLarge", "too_large", 413);
export const Unauthorized = codeClass("Unauthorized", "unauthorized", 401);
export const Forbidden = codeClass("Forbidden", "forbidden", 403);
export const Unavailable = codeClass("Unavailable", "unavailable", 503);
export const Overloaded = codeClass("Overloaded", "overloaded", 503);
export const Internal = codeClass("Internal", "internal", 500);
export const MethodNotAllowed = codeClass("MethodNotAllowed", "method_not_allowed", 405);
/** The resume point (after_seq / Last-Event-ID) predates the compacted log: subscribe again without one. */
export const Gone = codeClass("Gone", "gone", 410);

const RateLimitedBase = codeClass("RateLimited", "rate_limited", 429);
export class RateLimited extends RateLimitedBase {
  /** How long the server asks the caller to wait before retrying, in ms (null when unsaid). */
  get retryAfterMs() {
    const value = this.extra.retry_after_ms;
    return typeof value === "number" && Number.isFinite(value) ? value : null;
  }
}

/** Every error class by its wire code. */
export const ERROR_CLASSES = Object.freeze(
  Object.fromEntries(
    [
      BadFrame, BadRequest, UnknownOp, NotFound, Exists, DimensionMismatch, InvalidVector, TooLarge,
      Unauthorized, Forbidden, RateLimited, Unavailable, Overloaded, Internal, MethodNotAllowed,
      Gone,
    ].map((cls) => [cls.code, cls]),
  ),
);

// Used only when an HTTP error has no readable {"error": ...} body (e.g. a proxy answered).
const STATUS_CLASSES = {
  400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed,
  409: Exists, 410: Gone, 413: TooLarge, 422: BadRequest, 429: RateLimited, 503: Unavailable,
};

export class ClientError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/**
 * The connection is closed or was lost; requests in flight have no answer. Whether a write in
 * flight was applied is unknown: reconnect, then read back if it matters. `closeCode` and
 * `reason` are the WebSocket close code and reason when there was one.
 */
export class ConnectionClosed extends ClientError {
  constructor(message = "connection closed", closeCode = null, reason = "") {
    super(closeCode === null ? message : `${message} (code ${closeCode}${reason ? ", " + reason : ""})`);
    this.closeCode = closeCode;
    this.reason = reason;
  }
}

/** No reply within the request's timeout. The request may still be applied by the server. */
export class RequestTimeout extends ClientError {}

/** The server sent something that does not follow the Shoal wire protocol. */
export class ProtocolError extends ClientError {}

/**
 * The error for a wire `error` map ({code, message, ...extra}). Never throws: a malformed map
 * becomes the class for `httpStatus` (Internal without one).
 * @returns {ShoalError}
 */
export function errorFromWire(body, httpStatus = null) {
  if (body && typeof body === "object" && typeof body.code === "string") {
    const { code, message, ...extra } = body;
    const cls = ERROR_CLASSES[code];
    const text = typeof message === "string" ? message : "";
    return cls ? new cls(text, extra) : new ShoalError(code, text, extra);
  }
  return errorFromStatus(httpStatus ?? 500, "malformed error body");
}

/** The best-matching error for an HTTP status that came without a Shoal error body. */
export function errorFromStatus(httpStatus, message) {
  const cls = STATUS_CLASSES[httpStatus] ?? Internal;
  return new cls(message, { http_status: httpStatus });
}

/** The error of an HTTP error response (JSON body `{"error": {...}}`, else by status). */
export async function errorFromResponse(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && typeof body === "object" && body.error) return errorFromWire(body.error, response.status);
  } catch {
    // Not JSON: fall through to the status.
  }
  return errorFromStatus(response.status, text.slice(0, 200) || `HTTP ${response.status}`);
}

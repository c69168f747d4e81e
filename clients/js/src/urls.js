// Endpoint URLs from whatever base the caller has: ws://h:p/v1/ws, http://h:p, wss://h:p/prefix.

import { ClientError } from "./errors.js";

export const WS_PATH = "/v1/ws";
const WS_SCHEMES = { "ws:": "ws:", "wss:": "wss:", "http:": "ws:", "https:": "wss:" };
const HTTP_SCHEMES = { "ws:": "http:", "wss:": "https:", "http:": "http:", "https:": "https:" };

function parse(url, schemes) {
  let parsed;
  try {
    parsed = new URL(String(url));
  } catch {
    throw new ClientError(`not a ws://, wss://, http:// or https:// URL: ${JSON.stringify(url)}`);
  }
  const scheme = schemes[parsed.protocol];
  if (!scheme || !parsed.host) throw new ClientError(`not a ws://, wss://, http:// or https:// URL: ${JSON.stringify(url)}`);
  return { parsed, scheme, path: parsed.pathname.replace(/\/+$/, "") };
}

/** The WebSocket endpoint for `url`: `ws(s)://h:p/v1/ws` as is; any other accepted base gets
 * `ws`/`wss` and `/v1/ws` appended. Throws ClientError for other schemes. */
export function wsUrl(url) {
  const { parsed, scheme, path } = parse(url, WS_SCHEMES);
  const wsPath = path.endsWith(WS_PATH) ? path : path.replace(/\/v1$/, "") + WS_PATH;
  return `${scheme}//${parsed.host}${wsPath}${parsed.search}`;
}

/** The HTTP base URL (no trailing slash, no `/v1`) for any URL `wsUrl` accepts. */
export function httpBase(url) {
  const { parsed, scheme, path } = parse(url, HTTP_SCHEMES);
  let base = path;
  if (base.endsWith(WS_PATH)) base = base.slice(0, -WS_PATH.length);
  base = base.replace(/\/v1$/, "").replace(/\/+$/, "");
  return `${scheme}//${parsed.host}${base}`;
}

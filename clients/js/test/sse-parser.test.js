// The text/event-stream parser used where EventSource is missing (Node): chunking, line
// endings, comments, multi-line data, ids and retry, as the WHATWG rules say.

import assert from "node:assert/strict";
import { test } from "node:test";
import { SSEParser } from "shoal-client";

const STREAM = "retry: 2000\n\n: ping\n\nid: 42\nevent: match\ndata: {\"seq\":42}\n\nid: 43\nevent: match\ndata: {\"seq\":43}\n\n";

test("a whole stream gives its events, comments and retry handled", () => {
  const parser = new SSEParser();
  const events = parser.feed(STREAM);
  assert.deepEqual(events, [
    { id: "42", event: "match", data: '{"seq":42}' },
    { id: "43", event: "match", data: '{"seq":43}' },
  ]);
  assert.equal(parser.retry, 2000);
});

test("any chunking gives the same events", () => {
  const whole = new SSEParser().feed(STREAM);
  for (let size = 1; size <= 7; size++) {
    const parser = new SSEParser();
    const events = [];
    for (let i = 0; i < STREAM.length; i += size) events.push(...parser.feed(STREAM.slice(i, i + size)));
    assert.deepEqual(events, whole, `chunks of ${size}`);
  }
});

test("CRLF and CR line endings, split CRLF across chunks", () => {
  const parser = new SSEParser();
  const events = [...parser.feed("id: 1\r\nevent: upsert\r\ndata: a\r"), ...parser.feed("\n\r\nid: 2\rdata: b\r\r\n")];
  assert.deepEqual(events, [
    { id: "1", event: "upsert", data: "a" },
    { id: "2", event: "message", data: "b" },
  ]);
});

test("multi-line data, fields without a colon or space, ids persist, bad retry ignored, BOM", () => {
  const parser = new SSEParser();
  const events = parser.feed("\uFEFFid:7\ndata:one\ndata\ndata:  two\nretry: soon\n\nevent: x\n\ndata: z\n\n");
  assert.deepEqual(events, [
    { id: "7", event: "message", data: "one\n\n two" },
    { id: "7", event: "message", data: "z" }, // a block without data dispatches nothing, resets event
  ]);
  assert.equal(parser.retry, null);
});

test("an unfinished block is held until its blank line", () => {
  const parser = new SSEParser();
  assert.deepEqual(parser.feed("event: lagged\ndata: {\"dropped\":3}\n"), []);
  assert.deepEqual(parser.feed("\n"), [{ id: "", event: "lagged", data: '{"dropped":3}' }]);
});

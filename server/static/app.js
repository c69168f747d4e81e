// The Shoal browser page: search and live matches through the shoal-client package (the copy in
// /static/vendor/shoal-client/, loaded through the import map in index.html). Search goes over
// the WebSocket protocol; live matches over a WebSocket subscription or the SSE subscribe
// endpoint (EventSource), as the user picks.

import { ShoalClient, changesSSE, subscribeSSE } from "shoal-client";

const $ = (id) => document.getElementById(id);
const MAX_LIVE = 200;
const wsEndpoint = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;

// --- the connection: one client, reopened (with the key) when it closed or the key changed ---

let client = null;
let clientKey = "";
let opening = null;

function setBadge(open) {
  const badge = $("conn");
  badge.textContent = open ? "connected" : "disconnected";
  badge.className = "badge " + (open ? "ok" : "bad");
}

async function connection() {
  const key = $("key").value.trim();
  if (client && !client.closed && key === clientKey) return client;
  if (opening) return opening;
  opening = (async () => {
    if (client && !client.closed) await client.close();
    try {
      const next = await ShoalClient.connect(wsEndpoint, { key: key || undefined, timeoutMs: 30_000 });
      next.onclose = () => setBadge(false);
      client = next;
      clientKey = key;
      setBadge(true);
      return next;
    } catch (err) {
      setBadge(false);
      throw err;
    } finally {
      opening = null;
    }
  })();
  return opening;
}

// --- rendering ----------------------------------------------------------------------------

function hitItem(hit, extra) {
  const li = document.createElement("li");
  li.className = "hit";
  li.dataset.id = hit.id;
  const head = document.createElement("div");
  head.className = "head";
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = hit.id;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = (extra ? extra + " · " : "") + "score " + Number(hit.score).toFixed(3);
  head.append(id, score);
  li.append(head);
  if (hit.text) {
    const p = document.createElement("p");
    p.className = "text";
    p.textContent = hit.text.length > 400 ? hit.text.slice(0, 400) + "…" : hit.text;
    li.append(p);
  }
  if (hit.metadata && Object.keys(hit.metadata).length) {
    const m = document.createElement("p");
    m.className = "meta";
    m.textContent = JSON.stringify(hit.metadata);
    li.append(m);
  }
  return li;
}

function status(el, text, isError) {
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

/** What the page shows for an error: the server's message when it gave one. */
function describe(err) {
  return err && err.serverMessage ? `${err.code}: ${err.serverMessage}` : String((err && err.message) || err);
}

/** The filter box as a `where` map, or undefined when empty; throws a readable Error. */
function whereFilter() {
  const raw = $("where").value.trim();
  if (!raw) return undefined;
  let where;
  try {
    where = JSON.parse(raw);
  } catch {
    throw new Error('the filter must be JSON, e.g. {"kind": "pet"}');
  }
  if (!where || typeof where !== "object" || Array.isArray(where)) throw new Error("the filter must be a JSON object");
  return where;
}

// --- collections and their live count ----------------------------------------------------

let counting = null; // { collection, stream } of the change feed behind the count badge

async function showCount(collection) {
  try {
    const count = await (await connection()).count(collection);
    if (counting && counting.collection === collection) $("count").textContent = `${count} docs`;
  } catch {
    // the collection went away, or the connection did: the next change or refresh tells
  }
}

/** Keep the count badge current: read it once, then again after every change (at most a few
 * times a second), as the collection's change feed reports them. */
async function followCount() {
  const collection = $("collection").value;
  if (counting && counting.collection === collection) return;
  if (counting) counting.stream.close();
  counting = null;
  $("count").textContent = "–";
  if (!collection) return;
  const key = $("key").value.trim();
  const stream = changesSSE(location.origin, collection, { key: key || undefined, reconnect: true });
  const mine = { collection, stream };
  counting = mine;
  await showCount(collection);
  let due = null;
  try {
    for await (const change of stream) {
      if (counting !== mine) break;
      if (change.event !== "upsert" && change.event !== "delete") continue;
      due ??= setTimeout(() => {
        due = null;
        showCount(collection);
      }, 250);
    }
  } catch {
    if (counting === mine) $("count").textContent = "–";
  }
}

async function createCollection(event) {
  event.preventDefault();
  const name = $("new-collection").value.trim();
  if (!name) return;
  try {
    await (await connection()).createCollection(name, { ifNotExists: true });
    $("new-collection").value = "";
    await loadCollections();
    $("collection").value = name;
    followCount();
    status($("add-status"), `Collection ${name} is ready: add documents below.`);
  } catch (err) {
    status($("add-status"), describe(err), true);
  }
}

async function addDocument(event) {
  event.preventDefault();
  const collection = $("collection").value;
  const text = $("doc-text").value.trim();
  if (!collection || !text) {
    status($("add-status"), "Pick a collection and write some text first.", true);
    return;
  }
  const doc = { id: $("doc-id").value.trim() || `doc-${Date.now().toString(36)}`, text };
  try {
    const meta = $("doc-meta").value.trim();
    if (meta) {
      doc.metadata = JSON.parse(meta);
      if (!doc.metadata || typeof doc.metadata !== "object" || Array.isArray(doc.metadata)) {
        throw new Error("metadata must be a JSON object");
      }
    }
  } catch (err) {
    status($("add-status"), err instanceof SyntaxError ? "metadata must be JSON" : describe(err), true);
    return;
  }
  try {
    const reply = await (await connection()).upsert(collection, [doc]);
    status($("add-status"), `Added ${doc.id} (seq ${reply.seq}).`);
    $("doc-id").value = "";
    $("doc-text").value = "";
  } catch (err) {
    status($("add-status"), describe(err), true);
  }
}

// --- collections --------------------------------------------------------------------------

async function loadCollections() {
  const select = $("collection");
  const current = select.value;
  try {
    const collections = await (await connection()).listCollections();
    select.replaceChildren();
    for (const c of collections) {
      const opt = document.createElement("option");
      opt.value = c.name;
      opt.textContent = `${c.name} (${c.count} docs, ${c.metric})`;
      select.append(opt);
    }
    if ([...select.options].some((o) => o.value === current)) select.value = current;
    status($("search-status"), collections.length ? "" : "No collections yet: create one.");
    followCount();
  } catch (err) {
    status($("search-status"), describe(err), true);
  }
}

// --- search -------------------------------------------------------------------------------

async function search(event) {
  event.preventDefault();
  const collection = $("collection").value;
  const text = $("query").value.trim();
  if (!collection || !text) return;
  const k = Math.max(1, Math.min(1000, parseInt($("k").value, 10) || 10));
  status($("search-status"), "Searching…");
  try {
    const mode = $("mode").value;
    const reply = await (await connection()).query(collection, { text, k, mode, where: whereFilter() });
    $("results").replaceChildren(...reply.hits.map((h) => hitItem(h)));
    status($("search-status"), `${reply.hits.length} result(s) in ${reply.took_ms} ms`);
  } catch (err) {
    status($("search-status"), describe(err), true);
  }
}

// --- live matches: a subscription (WebSocket) or an event stream (SSE) ---------------------

let live = null; // the Subscription or EventStream being shown

function showMatch(hit, seq) {
  const li = hitItem(hit, "seq " + seq);
  li.classList.add("match", "fresh");
  const list = $("live");
  list.prepend(li);
  while (list.children.length > MAX_LIVE) list.lastElementChild.remove();
  setTimeout(() => li.classList.remove("fresh"), 50);
}

/** A document that matched no longer does: mark it, then let it go. */
function showLeave(id) {
  for (const li of $("live").querySelectorAll("li")) {
    if (li.dataset.id === id && !li.classList.contains("left")) {
      li.classList.add("left");
      li.title = "left the results";
      setTimeout(() => li.remove(), 1500);
    }
  }
}

/** A top-k list replaces the shown one; entrants are highlighted, leavers shown leaving. */
function showTopk(hits, seq) {
  const list = $("live");
  const before = new Map([...list.querySelectorAll("li:not(.left)")].map((li) => [li.dataset.id, li]));
  const now = new Set(hits.map((h) => h.id));
  const items = hits.map((hit, i) => {
    const li = hitItem(hit, `#${i + 1} · seq ${seq}`);
    li.classList.add("match");
    if (!before.has(hit.id)) {
      li.classList.add("fresh", "entered");
      setTimeout(() => li.classList.remove("fresh"), 50);
    }
    return li;
  });
  const leaving = [...before].filter(([id]) => !now.has(id)).map(([, li]) => li);
  for (const li of leaving) {
    li.classList.add("left");
    li.title = "left the top list";
    setTimeout(() => li.remove(), 1500);
  }
  list.replaceChildren(...items, ...leaving);
}

function stopWatching(message, isError) {
  const current = live;
  live = null;
  if (current) {
    if (typeof current.unsubscribe === "function") current.unsubscribe().catch(() => {});
    else current.close();
  }
  $("stop").disabled = true;
  $("watch").disabled = false;
  $("watch-top").disabled = false;
  if (message) status($("live-status"), message, isError);
}

const TOP_K = 10;

async function watch(event, top = false) {
  event.preventDefault();
  const collection = $("collection").value;
  const text = $("query").value.trim();
  const threshold = parseFloat($("threshold").value);
  const transport = $("transport").value;
  if (!collection || !text || (!top && Number.isNaN(threshold))) {
    status($("live-status"), "Pick a collection, type a query and a min score first.", true);
    return;
  }
  stopWatching();
  $("live").replaceChildren();
  $("watch").disabled = true;
  $("watch-top").disabled = true;
  $("stop").disabled = false;
  status($("live-status"), "Connecting…");
  const over = transport === "ws" ? "WebSocket" : "SSE";
  const banner = top
    ? `Live top ${TOP_K} (${over}): "${text}" in ${collection}`
    : `Live (${over}): "${text}" in ${collection}, score ≥ ${threshold}`;
  const ask = top ? { k: TOP_K } : { threshold };
  let stream = null;
  try {
    const where = whereFilter();
    if (transport === "ws") {
      stream = await (await connection()).subscribe(collection, { text, ...ask, where });
      status($("live-status"), banner);
    } else {
      const key = $("key").value.trim();
      const onopen = () => live === stream && status($("live-status"), banner);
      const options = { text, ...ask, where, key: key || undefined, reconnect: true, onopen };
      stream = subscribeSSE(location.origin, collection, options);
    }
    live = stream;
    for await (const push of stream) {
      if (live !== stream) break;
      // A WebSocket push is {event, sub, seq, hit}; an SSE event is {id, event, data: {seq, hit}}.
      const body = transport === "ws" ? push : push.data;
      if (push.event === "match") showMatch(body.hit, body.seq);
      else if (push.event === "leave") showLeave(body.id);
      else if (push.event === "topk") showTopk(body.hits, body.seq);
      else if (push.event === "lagged" && top) status($("live-status"), `${banner} (skipped ${body.dropped} older list(s))`);
      else if (push.event === "lagged") status($("live-status"), `Fell behind: ${body.dropped} match(es) skipped.`, true);
      else if (push.event === "ended") {
        stopWatching(`The server ended the subscription: ${body.reason}.`, true);
        return;
      }
    }
    if (live === stream) stopWatching("The stream ended.");
  } catch (err) {
    if (stream === null || live === stream) stopWatching(describe(err), true);
  }
}

// --- wiring -------------------------------------------------------------------------------

$("search-form").addEventListener("submit", search);
$("watch-form").addEventListener("submit", (event) => watch(event, false));
$("watch-top").addEventListener("click", (event) => watch(event, true));
$("stop").addEventListener("click", () => stopWatching("Stopped."));
$("refresh").addEventListener("click", loadCollections);
$("collection").addEventListener("change", followCount);
$("create-form").addEventListener("submit", createCollection);
$("add-form").addEventListener("submit", addDocument);
$("key").addEventListener("change", loadCollections);
loadCollections();

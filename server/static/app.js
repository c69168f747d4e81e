// The Shoal browser page: search over the WebSocket protocol (msgpack frames, subprotocol
// shoal.v1) and a live panel fed by the SSE subscribe endpoint (EventSource).
// MessagePack comes from /static/vendor/msgpack.min.js (@msgpack/msgpack, served by Shoal).
(() => {
  "use strict";

  const { encode, decode } = window.MessagePack;
  const $ = (id) => document.getElementById(id);
  const MAX_LIVE = 200;

  // --- the WebSocket client: one connection, requests matched to replies by id -------------

  class ShoalSocket {
    constructor(url) {
      this.url = url;
      this.nextId = 1;
      this.pending = new Map();
      this.ready = null;
      this.ws = null;
      this.onstate = () => {};
    }

    connect() {
      if (this.ready) return this.ready;
      this.ready = new Promise((resolve, reject) => {
        const ws = new WebSocket(this.url, ["shoal.v1"]);
        ws.binaryType = "arraybuffer";
        ws.onopen = () => { this.onstate("open"); resolve(this); };
        ws.onerror = () => reject(new Error("cannot reach the server"));
        ws.onclose = () => {
          this.onstate("closed");
          this.ready = null;
          for (const { reject: fail } of this.pending.values()) fail(new Error("connection closed"));
          this.pending.clear();
        };
        ws.onmessage = (ev) => this.receive(ev.data);
        this.ws = ws;
      });
      return this.ready;
    }

    receive(data) {
      if (!(data instanceof ArrayBuffer)) return;
      let msg;
      try { msg = decode(new Uint8Array(data)); } catch { return; }
      if (!msg || msg.id === undefined || msg.id === null) return; // pushes: this page uses SSE
      const waiter = this.pending.get(msg.id);
      if (!waiter) return;
      this.pending.delete(msg.id);
      if (msg.ok) waiter.resolve(msg);
      else {
        const err = new Error((msg.error && msg.error.message) || "request failed");
        err.code = msg.error && msg.error.code;
        waiter.reject(err);
      }
    }

    async request(op, args = {}) {
      await this.connect();
      const id = this.nextId++;
      return new Promise((resolve, reject) => {
        this.pending.set(id, { resolve, reject });
        this.ws.send(encode({ id, op, ...args }));
      });
    }
  }

  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const shoal = new ShoalSocket(`${scheme}://${location.host}/v1/ws`);
  let authed = "";

  shoal.onstate = (state) => {
    const badge = $("conn");
    badge.textContent = state === "open" ? "connected" : "disconnected";
    badge.className = "badge " + (state === "open" ? "ok" : "bad");
    if (state !== "open") authed = "";
  };

  async function call(op, args) {
    const key = $("key").value.trim();
    if (key && key !== authed) {
      await shoal.request("auth", { key });
      authed = key;
    }
    return shoal.request(op, args);
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

  // --- collections --------------------------------------------------------------------------

  async function loadCollections() {
    const select = $("collection");
    const current = select.value;
    try {
      const reply = await call("list_collections");
      select.replaceChildren();
      for (const c of reply.collections) {
        const opt = document.createElement("option");
        opt.value = c.name;
        opt.textContent = `${c.name} (${c.count} docs, ${c.metric})`;
        select.append(opt);
      }
      if ([...select.options].some((o) => o.value === current)) select.value = current;
      status($("search-status"), reply.collections.length ? "" : "No collections yet.");
    } catch (err) {
      status($("search-status"), err.message, true);
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
      const reply = await call("query", { collection, text, k });
      $("results").replaceChildren(...reply.hits.map((h) => hitItem(h)));
      status($("search-status"), `${reply.hits.length} result(s) in ${reply.took_ms} ms`);
    } catch (err) {
      status($("search-status"), err.message, true);
    }
  }

  // --- live matches (Server-Sent Events) ----------------------------------------------------

  let source = null;

  function stopWatching(message) {
    if (source) source.close();
    source = null;
    $("stop").disabled = true;
    $("watch").disabled = false;
    if (message) status($("live-status"), message);
  }

  function watch(event) {
    event.preventDefault();
    const collection = $("collection").value;
    const text = $("query").value.trim();
    const threshold = parseFloat($("threshold").value);
    if (!collection || !text || Number.isNaN(threshold)) {
      status($("live-status"), "Pick a collection, type a query and a min score first.", true);
      return;
    }
    stopWatching();
    const params = new URLSearchParams({ text, threshold: String(threshold) });
    const key = $("key").value.trim();
    if (key) params.set("key", key); // EventSource cannot send an Authorization header
    const url = `/v1/collections/${encodeURIComponent(collection)}/subscribe?${params}`;
    source = new EventSource(url);
    $("live").replaceChildren();
    $("watch").disabled = true;
    $("stop").disabled = false;
    status($("live-status"), "Connecting…");
    source.onopen = () => status($("live-status"), `Live: "${text}" in ${collection}, score ≥ ${threshold}`);
    source.onerror = () => {
      if (source && source.readyState === EventSource.CLOSED) stopWatching("The server refused the subscription.");
      else status($("live-status"), "Reconnecting (no match is lost)…", true);
    };
    source.addEventListener("match", (ev) => {
      const data = JSON.parse(ev.data);
      const li = hitItem(data.hit, "seq " + data.seq);
      li.classList.add("match", "fresh");
      const list = $("live");
      list.prepend(li);
      while (list.children.length > MAX_LIVE) list.lastElementChild.remove();
      setTimeout(() => li.classList.remove("fresh"), 50);
    });
    source.addEventListener("lagged", () => status($("live-status"), "Fell behind; catching up from the log…", true));
  }

  // --- wiring -------------------------------------------------------------------------------

  $("search-form").addEventListener("submit", search);
  $("watch-form").addEventListener("submit", watch);
  $("stop").addEventListener("click", () => stopWatching("Stopped."));
  $("refresh").addEventListener("click", loadCollections);
  $("key").addEventListener("change", loadCollections);
  loadCollections();
})();

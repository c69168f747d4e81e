"""Broker-source throughput: entries/s from XADD to committed and indexed, against the WebSocket.

    python -m load.source [--docs 10000] [--text-docs 2000] [--batch 500] [--in-flight 2]
                          [--repeats 1] [--vectors array|base64] [--json PATH]

Starts a `redis-server` on a free loopback port and a local `shoal serve --source ...` reading
it (`SHOAL_SOURCE_READ_BATCH` = `--batch`), then measures in the same run, on corpus passages
(`load.corpus`) with their vectors:
- vectors, WebSocket: `--docs` documents (vector + text) upserted in batches of `--batch`, with
  `--in-flight` upserts outstanding, into a fresh collection: docs/s from the first send to
  the last ack;
- vectors, source: the same documents as entries (`doc` = the document as JSON text, the vector's
  values at float32 precision, or with `--vectors base64` base64 of their float32 bytes), encoded
  as XADD commands beforehand and sent in pipelined chunks from a thread while the clock runs:
  entries/s from the first XADD to the completion event of the last one (published after its
  commit and indexing, as the WebSocket's ack), both on Redis's clock;
- text, source: `--text-docs` passages with text only (the server embeds them), timed the same;
- text, raw onnxruntime: the same texts embedded by `MiniLM` in this process, all of them sorted
  by token count at once and cut into runs of the embedder's limits, on one worker thread per
  CPU (`load.embed_bench.raw_run`), beside the source's text run of the same repeat - the
  ceiling.
Each pair (WebSocket and source with vectors; raw and source with text) runs back to back, the
order alternating from one repeat to the next.
Ratios: source / WebSocket with vectors (target >= 0.8) and source / raw with text (>= 0.9), of
the best rates and, per repeat, with their median. Beside the text ratio, the CPU time per text
of each side (raw: this process; source: the server with its PostgreSQL, and redis-server) gives
`cpu_ratio_text`, which what the machine's neighbours take moves far less.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import hiredis
import numpy as np
import redis

from actors.onnx_model import MiniLM
from load.common import CpuMeter, log, machine_info, tree_cpu_seconds, unique_name, write_json
from load.corpus import load_corpus
from load.embed_bench import raw_run
from load.ingest import run_ingest
from load.redis_server import RedisServer
from load.server import local_server
from models.config import EngineConfig
from shoal_client import ShoalClient

STREAM = "load"
NOTIFY = f"{STREAM}.indexed"  # the source's default notify stream
XADD_CHUNK = 1000
COMPLETION_WAIT_S = 600.0  # for the completion events of one timed phase


def _entries(
    collection: str, ids: list[str], texts: list[str], vectors: np.ndarray | None, encoding: str = "array"
) -> list[dict[str, str]]:
    out = []
    for i, doc_id in enumerate(ids):
        doc: dict[str, Any] = {"id": doc_id, "text": texts[i]}
        if vectors is not None and encoding == "base64":
            doc["vector"] = base64.b64encode(vectors[i].astype("<f4").tobytes()).decode("ascii")
        elif vectors is not None:
            # At float32 precision (9 significant digits round-trip a float32 exactly): half the
            # bytes of float64's repr, which the vector's values do not need.
            doc["vector"] = [float(f"{x:.9g}") for x in vectors[i].tolist()]
        out.append({"collection": collection, "doc": json.dumps(doc)})
    return out


def _resp(*args: str) -> bytes:
    """One command in the Redis protocol (RESP), as a client library would send it (redis-py's
    own packer has no type information, and the project keeps mypy strict without ignores)."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts += [f"${len(data)}\r\n".encode(), data, b"\r\n"]
    return b"".join(parts)


def _xadd_commands(entries: list[dict[str, str]]) -> list[tuple[bytes, int]]:
    """The XADDs of `entries`, encoded in chunks of `XADD_CHUNK` before any clock runs: packing
    them while the clock runs would time the load generator's Python (a fifth of the CPU an
    entry costs the server) on the same two cores, which a producer on its own machine does not
    take from the server; the WebSocket side likewise builds its batches first."""
    commands = [_resp("XADD", STREAM, "*", *(part for pair in fields.items() for part in pair)) for fields in entries]
    chunks = (commands[start : start + XADD_CHUNK] for start in range(0, len(commands), XADD_CHUNK))
    return [(b"".join(chunk), len(chunk)) for chunk in chunks]


def _stream_ms(entry_id: bytes | str) -> int:
    """The Redis server's clock (ms) when it added the entry `entry_id` names."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def _xadd(port: int, chunks: list[tuple[bytes, int]]) -> int:
    """Send each chunk of XADDs and read its replies (pipelined, as redis-py's pipeline does).
    Returns when the first entry was added (Redis's clock, ms)."""
    reader = hiredis.Reader()
    first: int | None = None
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for chunk, expected in chunks:
            sock.sendall(chunk)
            replies = 0
            while replies < expected:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("redis-server closed the connection")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise reply
                    if first is None:
                        first = _stream_ms(reply)
                    replies += 1
    assert first is not None
    return first


def _notify_tail(port: int) -> str:
    """The id of the notify stream's last event ("0-0" if none yet)."""
    with redis.Redis(host="127.0.0.1", port=port) as r:
        last = r.xrevrange(NOTIFY, count=1)
    return last[0][0].decode() if last else "0-0"


def _completed(port: int, collection: str, n: int, after: str) -> int:
    """Wait for `n` completion events of `collection` after event `after`; returns when the
    last one was added (Redis's clock, ms). Reading them from Redis costs the server nothing,
    where polling its count would (a request every few ms on the event loop being measured)."""
    name = collection.encode()
    seen = rejected = 0
    deadline = time.monotonic() + COMPLETION_WAIT_S
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=30) as r:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen} of {n} completion events of {collection} within {COMPLETION_WAIT_S:g} s")
            reply = r.xread({NOTIFY: after}, count=1000, block=1000)
            for _stream, events in reply or []:
                for event_id, fields in events:
                    after = event_id.decode()
                    if fields.get(b"collection") != name:
                        continue
                    seen += 1
                    rejected += fields.get(b"status") != b"indexed"
                    if seen == n:
                        if rejected:
                            raise RuntimeError(f"{rejected} of {n} entries were rejected")
                        return _stream_ms(event_id)


async def _through_source(ws: ShoalClient, port: int, collection: str, entries: list[dict[str, str]]) -> float:
    """Seconds from the first XADD until the completion event of the last entry: Redis's
    clock on both ends (ms). The source publishes an entry's completion after its commit and
    indexing, as the WebSocket acks an upsert."""
    chunks = _xadd_commands(entries)
    after = await anyio.to_thread.run_sync(_notify_tail, port)
    times: dict[str, int] = {}

    async def run(key: str, fn: Callable[[], int]) -> None:
        times[key] = await anyio.to_thread.run_sync(fn)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "done", lambda: _completed(port, collection, len(entries), after))
        tg.start_soon(run, "first", lambda: _xadd(port, chunks))
    count = await ws.count(collection)
    assert count == len(entries), f"{collection} counts {count} of {len(entries)} entries"
    return max(times["done"] - times["first"], 1) / 1000


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    corpus = load_corpus(max(20_000, args.docs + args.text_docs), 1_000)
    n, m = args.docs, args.text_docs
    texts, vectors = corpus.texts[:n], corpus.vectors[:n]
    text_only = corpus.texts[n : n + m]
    result: dict[str, Any] = {
        "machine": machine_info(),
        "docs": n,
        "text_docs": m,
        "batch": args.batch,
        "vectors": args.vectors,
    }
    runs: dict[str, list[float]] = {"ws_vector": [], "source_vector": [], "source_text": [], "raw_text": []}
    # CPU by process over each timed phase: the load generator (the WebSocket client, or the
    # producer's XADDs), the server with its PostgreSQL, and everything else (redis-server).
    cpu: dict[str, list[dict[str, float | None]]] = {key: [] for key in runs}
    # CPU seconds per text: raw onnxruntime (this process) and the source's whole pipeline (the
    # server, its PostgreSQL and redis-server), a ratio that a neighbour taking the cores'
    # time moves far less than the throughput ratio.
    text_cpu: dict[str, list[float]] = {"raw_text": [], "source_text": []}

    model = MiniLM(intra_threads=1)
    model.encode(text_only[:16])  # warm up before anything is timed
    config = EngineConfig()

    with RedisServer() as redis_server:
        env = {
            "SHOAL_SOURCES": redis_server.url(STREAM),
            "SHOAL_SOURCE_READ_BATCH": str(args.batch),
            "SHOAL_LOG_LEVEL": "warning",
        }
        with local_server(env) as proc:
            async with ShoalClient.connect(proc.ws_url) as ws:
                for repeat in range(args.repeats):
                    ws_name, src_name, txt_name = (unique_name(p) for p in ("ws", "src", "txt"))
                    for name in (ws_name, src_name, txt_name):
                        await ws.create_collection(name)
                    batches = [
                        [
                            {"id": f"w{i}", "text": texts[i], "vector": vectors[i].astype("<f4").tobytes()}
                            for i in range(start, min(start + args.batch, n))
                        ]
                        for start in range(0, n, args.batch)
                    ]
                    vector_entries = _entries(src_name, [f"s{i}" for i in range(n)], texts, vectors, args.vectors)
                    text_entries = _entries(txt_name, [f"t{i}" for i in range(m)], text_only, None)

                    async def ws_vectors(name: str = ws_name, batches: list[list[dict[str, Any]]] = batches) -> None:
                        meter = CpuMeter(proc.pid).start()
                        ingest = await run_ingest([ws], name, batches, in_flight=args.in_flight)
                        cpu["ws_vector"].append(meter.stop())
                        assert ingest.docs == n, ingest.errors
                        runs["ws_vector"].append(n / ingest.seconds)

                    async def source_vectors(
                        name: str = src_name, entries: list[dict[str, str]] = vector_entries
                    ) -> None:
                        meter = CpuMeter(proc.pid).start()
                        runs["source_vector"].append(n / await _through_source(ws, redis_server.port, name, entries))
                        cpu["source_vector"].append(meter.stop())

                    async def raw_text() -> None:  # with the server idle
                        batching = (config.embed_batch, config.embed_batch_tokens, config.embed_workers)
                        wall, raw_cpu = await anyio.to_thread.run_sync(raw_run, model, text_only, *batching)
                        runs["raw_text"].append(m / wall)
                        text_cpu["raw_text"].append(raw_cpu / m)

                    async def source_text(name: str = txt_name, entries: list[dict[str, str]] = text_entries) -> None:
                        meter = CpuMeter(proc.pid).start()
                        redis_before = tree_cpu_seconds(redis_server.pid) or 0.0
                        runs["source_text"].append(m / await _through_source(ws, redis_server.port, name, entries))
                        redis_cpu = (tree_cpu_seconds(redis_server.pid) or 0.0) - redis_before
                        used = meter.stop()
                        cpu["source_text"].append(used)
                        text_cpu["source_text"].append(((used["server_cpu_s"] or 0.0) + redis_cpu) / m)

                    # Each pair runs back to back, in turns which goes first, so a drift in what the
                    # machine's neighbours take falls on both sides alike.
                    phases: list[list[Callable[[], Awaitable[None]]]] = [
                        [ws_vectors, source_vectors],
                        [raw_text, source_text],
                    ]
                    for pair in phases:
                        for phase in pair if repeat % 2 == 0 else pair[::-1]:
                            await phase()
                    log(
                        f"source: repeat {repeat + 1}: ws {runs['ws_vector'][-1]:.0f}/s, source vectors"
                        f" {runs['source_vector'][-1]:.0f}/s, source text {runs['source_text'][-1]:.0f}/s,"
                        f" raw text {runs['raw_text'][-1]:.0f}/s"
                    )
                    for name in (ws_name, src_name, txt_name):
                        await ws.drop_collection(name)
    best = {key: round(max(values), 1) for key, values in runs.items()}
    result["per_s"] = {key: [round(v, 1) for v in values] for key, values in runs.items()}
    result["best_per_s"] = best
    result["cpu"] = {key: values for key, values in cpu.items() if values}
    result["source_vs_ws_vectors"] = round(best["source_vector"] / best["ws_vector"], 3)
    result["source_vs_raw_text"] = round(best["source_text"] / best["raw_text"], 3)
    # Each repeat runs its pair back to back: the median of the per-repeat ratios is the figure
    # least moved by whatever else the machine is doing.
    pairs = {"vectors": ("source_vector", "ws_vector"), "text": ("source_text", "raw_text")}
    for name, (num, den) in pairs.items():
        ratios = [a / b for a, b in zip(runs[num], runs[den], strict=True)]
        result[f"ratio_{name}_per_repeat"] = [round(r, 3) for r in ratios]
        result[f"ratio_{name}_median"] = round(statistics.median(ratios), 3)
    cpu_ratios = [a / b for a, b in zip(text_cpu["raw_text"], text_cpu["source_text"], strict=True)]
    result["cpu_ms_per_text"] = {key: [round(v * 1000, 2) for v in values] for key, values in text_cpu.items()}
    result["cpu_ratio_text_per_repeat"] = [round(r, 3) for r in cpu_ratios]
    result["cpu_ratio_text_median"] = round(statistics.median(cpu_ratios), 3)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m load.source", description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10_000, help="documents with vectors per side")
    parser.add_argument("--text-docs", type=int, default=2_000, help="text-only documents")
    parser.add_argument("--batch", type=int, default=500, help="WebSocket batch = source read batch")
    parser.add_argument("--in-flight", type=int, default=2, help="WebSocket upserts outstanding")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--vectors", choices=["array", "base64"], default="array", help="how the entries' documents carry vectors"
    )
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = anyio.run(bench, args)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()

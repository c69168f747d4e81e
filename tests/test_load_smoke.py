"""The load generators, run small and bounded against the session's real server, so they do not rot.

Each run uses synthetic vectors (nothing to build or cache), a few hundred requests at most, and
checks the JSON it writes: the expected fields, and no errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from load import algos, core_bench, ingest, mixed, query
from load.algos_rounds import bracket
from load.common import Histogram, format_table
from load.server import ROOT
from tests.server_process import ServerProcess

LATENCY_KEYS = {"count", "mean", "min", "p50", "p90", "p99", "p99_9", "max"}


def _read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def test_histogram_percentiles_match_the_order_statistics() -> None:
    rng = np.random.default_rng(3)
    samples = np.concatenate([rng.lognormal(np.log(0.002), 1.0, 50_000), [0.75, 1.5]])
    hist = Histogram()
    hist.record_many(samples.tolist())
    micros = np.round(samples * 1e6)
    for q in (50.0, 90.0, 99.0, 99.9):
        exact = float(np.percentile(micros, q, method="inverted_cdf"))
        assert abs(hist.percentile_us(q) - exact) <= max(1.0, 0.002 * exact), q
    assert hist.count == len(samples)
    assert hist.max_us == 1_500_000
    other = Histogram()
    other.record(10.0)
    hist.merge(other)
    assert hist.percentile_us(100.0) == 10_000_000
    summary = hist.summary_ms()
    assert set(summary) == LATENCY_KEYS and summary["p50"] <= summary["p99"] <= summary["max"]
    assert "p50" in format_table(["metric", "value"], [["p50", 1.5]])


def test_rounds_bracket_shoal_recall_with_the_nearest_anchor_settings() -> None:
    sweep = {
        "param": "ef",
        "points": [{"ef": 10, "recall": 0.8}, {"ef": 40, "recall": 0.95}, {"ef": 80, "recall": 0.99}],
    }
    used, match = bracket(sweep, 0.97)
    assert match == "interpolated" and [p["ef"] for p in used] == [40, 80]
    used, match = bracket(sweep, 0.95)  # a setting matches: timed alone
    assert match == "interpolated" and [p["ef"] for p in used] == [40]
    used, match = bracket(sweep, 0.5)  # the anchor's fastest setting already has more recall
    assert match == "above" and [p["ef"] for p in used] == [10]
    assert bracket(sweep, 0.995) == ([], "unreached")


def test_query_closed_loop(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "query.json"
    code = query.main(
        [
            *("--url", server.url, "--source", "synthetic", "--size", "600", "--queries", "40"),
            *("--clients", "4", "--requests", "300", "--seconds", "20", "--warmup", "0.2"),
            *("--include", "", "--json", str(out), "--quiet"),
        ]
    )
    r = _read(out)
    assert code == 0
    assert r["benchmark"] == "query" and r["mode"] == "closed"
    assert r["requests"] == 300 and r["error_count"] == 0 and r["errors"] == {}
    assert r["qps"] > 0 and r["seconds"] > 0
    assert set(r["latency_ms"]) == LATENCY_KEYS
    assert r["server_took_ms"]["count"] == 300
    # 600 documents: the server searches them exactly.
    assert r["recall_at_k"] == 1.0
    assert {"client_share", "server_share", "wall_s"} <= set(r["cpu"])


def test_query_open_loop_with_filter(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "query_open.json"
    code = query.main(
        [
            *("--url", server.url, "--source", "synthetic", "--size", "500", "--queries", "40"),
            *("--mode", "open", "--rate", "150", "--requests", "150", "--seconds", "5", "--clients", "3"),
            *("--warmup", "0", "--filter", "--json", str(out), "--quiet"),
        ]
    )
    r = _read(out)
    assert code == 0
    assert r["mode"] == "open" and r["filtered"] is True
    assert r["requests"] == 150 and r["error_count"] == 0
    assert set(r["latency_ms"]) == LATENCY_KEYS
    assert set(r["send_lag_ms"]) == LATENCY_KEYS and set(r["service_ms"]) == LATENCY_KEYS
    assert r["achieved_rate"] > 0
    # Latency counts from the scheduled send time, so it is never below the service time.
    assert r["latency_ms"]["p50"] >= r["service_ms"]["p50"] - 0.01
    assert r["recall_at_k"] == 1.0


@pytest.mark.parametrize(("mode", "docs", "batch"), [("vector", "1000", "250"), ("text", "48", "16")])
def test_ingest(server: ServerProcess, tmp_path: Path, mode: str, docs: str, batch: str) -> None:
    out = tmp_path / f"ingest_{mode}.json"
    code = ingest.main(
        [
            *("--url", server.url, "--source", "synthetic", "--size", "700", "--mode", mode),
            *("--docs", docs, "--batch", batch, "--clients", "2", "--json", str(out), "--quiet"),
        ]
    )
    r = _read(out)
    assert code == 0
    assert r["benchmark"] == "ingest" and r["mode"] == mode
    assert r["docs"] == int(docs) and r["error_count"] == 0
    assert r["batches"] == -(-int(docs) // int(batch))
    assert r["docs_per_s"] > 0 and r["count_check"] is True
    assert set(r["ack_ms"]) == LATENCY_KEYS


def test_core_bench_tiny(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "core.json"
    code = core_bench.main(
        [
            *("--url", server.url, "--source", "synthetic", "--size", "800", "--queries", "30"),
            *("--clients", "2", "--batch", "200", "--rounds", "1", "--query-seconds", "0.6"),
            *("--raw-seconds", "0.2", "--text-docs", "24", "--text-rounds", "1", "--text-clients", "1"),
            *("--json", str(out), "--quiet"),
        ]
    )
    r = _read(out)
    assert code == 0
    assert r["recall"]["unfiltered"] == 1.0 and r["recall"]["filtered_1pct"] == 1.0
    assert r["recall"]["errors"] == 0
    median = r["query"]["median"]
    for key in (
        "shoal_qps",
        "raw_batch_2_threads_qps",
        "ratio_vs_batch_2_threads",
        "ratio_vs_single_1_thread",
        "shoal_batch_qps",
        "batch_ratio_vs_batch_2_threads",
    ):
        assert median[key] > 0, key
    first = r["query"]["rounds"][0]
    assert first["shoal"]["error_count"] == 0
    assert first["shoal_batch"]["error_count"] == 0 and first["shoal_batch"]["failed_queries"] == 0
    assert r["ingest_vector"]["clients_1"]["count_check"] is True
    assert r["ingest_text"]["median"]["ratio"] > 0
    assert r["ingest_text"]["rounds"][0]["shoal"]["error_count"] == 0


def run_python(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python ARGS` from the repository root, as a user runs a load script; asserts it exits 0."""
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


def test_shoal_bench_runs_a_load_script(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    done = run_python(
        *("-m", "server.cli", "bench", "ingest", "--url", server.url),
        *("--source", "synthetic", "--size", "100", "--docs", "100", "--batch", "50"),
        *("--json", str(out), "--quiet"),
        timeout=60,
    )
    assert "docs/s" in done.stdout
    assert _read(out)["docs"] == 100


def test_mixed(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    code = mixed.main(
        [
            *("--url", server.url, "--source", "synthetic", "--size", "400", "--queries", "20"),
            *("--readers", "2", "--writers", "1", "--write-rate", "100", "--batch", "10"),
            *("--subscribers", "10", "--sub-conns", "2", "--seconds", "2", "--drain", "5"),
            *("--json", str(out), "--quiet"),
        ]
    )
    r = _read(out)
    assert code == 0
    assert r["benchmark"] == "mixed" and r["error_count"] == 0 and r["errors"] == {}
    assert r["query"]["requests"] > 0 and r["query"]["qps"] > 0
    assert set(r["query"]["latency_ms"]) == LATENCY_KEYS
    assert r["write"]["docs"] == 200 and r["write"]["docs_per_s"] > 0
    assert set(r["write"]["ack_ms"]) == LATENCY_KEYS
    subs = r["subscriptions"]
    assert subs["subscriptions"] == 10 and subs["pushes_delivered"] >= 1
    assert subs["lagged_events"] == 0
    assert set(subs["delivery_ms"]) == LATENCY_KEYS


@pytest.mark.timeout(300)
def test_algos_quick(server: ServerProcess, tmp_path: Path) -> None:
    out, png = tmp_path / "algos.json", tmp_path / "algos.png"
    code = algos.main(
        [
            *("--url", server.url, "--quick", "--source", "synthetic", "--seconds", "0.1"),
            *("--batch-queries", "16", "--json", str(out), "--plot", str(png), "--quiet"),
        ]
    )
    r = _read(out)
    assert code == 0
    assert {"corpus", "server_config", "fairness", "shoal", "anchors", "summary", "memory_vs_float32"} <= set(r)
    assert r["corpus"]["docs"] == 3000 and r["corpus"]["queries"] == 100
    families = {"hnsw", "hnsw int8", "hnsw f16", "flat", "ivf", "ivf int8", "ivf f16", "lsh"}
    assert {v["family"] for v in r["shoal"]} == families
    assert set(r["anchors"]) == families
    for v in r["shoal"]:
        # A kind this server does not offer is reported as refused (with the server's reason),
        # never a crash; every other one is measured in full.
        assert v["status"] in ("ok", "refused"), v
        if v["status"] == "refused":
            assert v["reason"]
            continue
        assert v["build"]["docs"] == 3000 and v["build"]["indexed"] is True
        assert v["build"]["inserts_per_s"] > 0 and v["build"]["build_s"] >= v["build"]["insert_s"]
        assert v["memory"]["bytes_per_vector"] > 0
        measured = [p for p in v["points"] if p["status"] == "ok"]
        assert measured and all(0.0 <= p["recall"] <= 1.0 and p["qps"] > 0 for p in measured), v["points"]
        assert all(not p["errors"] for p in measured)
        # Each point timed again in query_batch requests: every query answered, none failed.
        batches = [p["batch"] for p in measured]
        assert all(b["qps"] > 0 and b["queries_per_request"] == 16 and not b["errors"] for b in batches), batches
    # The server's default index (hnsw) is always measured.
    assert next(v for v in r["shoal"] if v["label"] == "hnsw")["status"] == "ok"
    for family, anchor in r["anchors"].items():
        assert anchor["status"] == "ok", (family, anchor)
        assert anchor["points"] and all(0.0 <= p["recall"] <= 1.0 and p["qps"] > 0 for p in anchor["points"])
        # Searched both ways: in calls of --clients queries (the ratio) and the whole set at once.
        assert all(p["qps_clients"] > 0 and p["cpu_us_per_query_clients"] > 0 for p in anchor["points"])
        assert anchor["bytes_per_vector"] > 0
    assert r["anchors"]["flat"]["points"][0]["recall"] == 1.0
    # Every measured default point is timed again against its anchor in interleaved rounds;
    # flat's (recall 1.0, which its anchor reaches) always has an anchor to be timed against.
    for v in (v for v in r["shoal"] if v["status"] == "ok"):
        assert v["rounds"]["anchor_match"] in ("interpolated", "above", "unreached"), v["rounds"]
    flat = next(v for v in r["shoal"] if v["family"] == "flat")["rounds"]
    assert flat["anchor_match"] == "interpolated" and len(flat["per_round"]) == 1 and flat["errors"] == 0
    one = flat["per_round"][0]
    assert one["qps"] > 0 and one["anchor_qps"] > 0 and one["ratio"] > 0 and one["batch_ratio_whole"] > 0
    assert flat["ratio"]["median"] == one["ratio"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_js_roundtrip(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "js.json"
    done = run_python(
        *("-m", "load.js_roundtrip", "--url", server.url),
        *("--queries", "50", "--rounds", "2", "--docs", "200", "--json", str(out), "--quiet"),
        timeout=120,
    )
    assert "JS / Python median round trip" in done.stdout
    result = _read(out)
    assert [len(result["rounds"][c]) for c in ("js", "python")] == [2, 2]
    assert all(result["median_ms"][c] > 0 for c in ("js", "python"))

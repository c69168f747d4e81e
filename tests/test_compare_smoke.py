"""`python -m load.compare`, tiny and bounded: a real Shoal server, hnswlib and numpy on the real
corpus (2,000 passages, 50 queries; the first run on a machine builds and caches that corpus).
Chroma is left out: installing it into its virtualenv takes minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from load.server import ROOT

# The corpus build (a scan of the machine's text and 2,050 embeddings) runs once per machine.
pytestmark = pytest.mark.timeout(600)


def test_compare_smoke(tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    md = tmp_path / "compare.md"
    args = ["--size", "2000", "--queries", "50", "--only", "shoal,hnswlib,numpy", "--seconds", "0.5"]
    args += ["--efs", "10,64,256", "--json", str(out), "--markdown", str(md)]
    done = subprocess.run(
        [sys.executable, "-m", "load.compare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())

    assert set(results) >= {"meta", "systems", "ratios_shoal_over", "targets", "recall_targets"}
    meta = results["meta"]
    assert meta["corpus"]["size"] == 2000 and meta["corpus"]["queries"] == 50
    assert meta["machine"]["cpus"] >= 1 and meta["efs"] == [10, 64, 256]
    assert set(results["systems"]) == {"shoal", "hnswlib", "hnswlib_single", "numpy"}
    for key, system in results["systems"].items():
        assert system["status"] == "ok", (key, system["error"])
        assert set(system["at_recall"]) == {"0.90", "0.95", "0.99"}
        for point in system["sweep"]:
            assert 0.0 <= point["recall"] <= 1.0 and point["qps"] > 0
            assert point["answered"] == 50  # every query answered at least once

    shoal = results["systems"]["shoal"]
    assert [p["ef"] for p in shoal["sweep"]] == [10, 64, 256]
    assert shoal["ingest"]["docs"] == 2000 and shoal["ingest"]["durable"] is True
    assert shoal["ingest"]["docs_per_s"] > 0
    assert all(p["p99_ms"] is not None and p["p99_ms"] >= p["p50_ms"] for p in shoal["sweep"])
    # A wider search never loses much recall, and at ef=256 on 2,000 documents it is near exact.
    assert shoal["sweep"][-1]["recall"] >= 0.97
    assert shoal["at_recall"]["0.90"] is not None

    numpy = results["systems"]["numpy"]
    assert numpy["sweep"][0]["ef"] is None and numpy["sweep"][0]["recall"] >= 0.999

    hnsw = results["systems"]["hnswlib"]["sweep"]
    # Shoal and raw hnswlib share index parameters: their recall at a high ef agrees.
    assert abs(hnsw[-1]["recall"] - shoal["sweep"][-1]["recall"]) < 0.03

    assert set(results["ratios_shoal_over"]) == {"hnswlib", "hnswlib_single", "numpy"}
    assert results["ratios_shoal_over"]["numpy"]["qps@0.95"] is not None
    assert [t["met"] for t in results["targets"]] == [None, None, None]  # Chroma and pgvector not run
    assert "Shoal" in md.read_text() and "target:" in done.stdout

"""The README's first examples run as written against a real server: the curl session, the
Python script, and the subscription script, in the order a new user meets them, with only the
address (and the collection's name, so the session's other tests cannot collide) changed. The
scores the README quotes in its comments are what the scripts print."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_HOST = "localhost:8080"
DEFAULT_WS = "ws://127.0.0.1:8080/v1/ws"


def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), flags=re.S | re.M)


def block_containing(language: str, marker: str) -> str:
    found = [block for block in fenced_blocks(language) if marker in block]
    assert len(found) == 1, f"expected one {language} block with {marker!r} in the README, found {len(found)}"
    return found[0]


def quoted_score(text: str, pattern: str) -> float:
    found = re.search(pattern, text)
    assert found, f"the README no longer quotes {pattern!r}"
    return float(found.group(1))


@pytest.fixture(scope="module")
def collection() -> str:
    return f"notes_{uuid.uuid4().hex[:8]}"


def adapt(code: str, server: ServerProcess, collection: str) -> str:
    host = server.url.removeprefix("http://")
    code = code.replace(DEFAULT_WS, server.ws_url).replace(DEFAULT_HOST, host)
    return re.sub(r"\bnotes\b", collection, code)


def run_python(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_curl_session_runs_as_written(server: ServerProcess, collection: str) -> None:
    script = adapt(block_containing("sh", "-d '{\"name\": \"notes\"}'"), server, collection)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # Three JSON replies: the collection, the upsert's ack, and the filtered query's one hit.
    assert f'"name":"{collection}"' in done.stdout.replace(" ", "")
    assert '"count":2' in done.stdout.replace(" ", ""), done.stdout
    assert done.stdout.rstrip().endswith("}") and '"id":"a"' in done.stdout.replace(" ", "")
    assert '"id":"b"' not in done.stdout.split('"hits"')[-1], "the where filter must leave b out"


def test_python_script_prints_what_its_comment_says(server: ServerProcess, collection: str) -> None:
    code = block_containing("python", "kitten on a rug")
    lines = run_python(adapt(code, server, collection))
    assert [line.split()[0] for line in lines] == ["a", "b"], lines
    claimed = quoted_score(code, r"# a (\d\.\d+) the cat sat on the mat")
    assert float(lines[0].split()[1]) == pytest.approx(claimed, abs=0.005), lines
    assert lines[0].endswith("the cat sat on the mat")


def test_subscription_script_gets_the_one_push_it_promises(server: ServerProcess, collection: str) -> None:
    code = block_containing("python", "cats and kittens")
    lines = run_python(adapt(code, server, collection))
    assert len(lines) == 1 and lines[0].startswith("match "), lines
    _, _seq, doc_id, score, *_ = lines[0].split()
    assert doc_id == "c"
    prose = README.read_text()
    assert float(score) == pytest.approx(quoted_score(prose, r"the kitten scores (\d\.\d+)"), abs=0.005)
    threshold = quoted_score(code, r"threshold=(\d\.\d+)")
    assert quoted_score(prose, r"the invoice (\d\.\d+)") < threshold < float(score)

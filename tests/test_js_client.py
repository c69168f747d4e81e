"""The JavaScript client (clients/js, npm package `shoal-client`): its `node --test` suite runs
against the session server, and the copies the browser page loads (server/static/vendor/) must
be byte-for-byte the package's own modules, so the page cannot drift from the client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server_process import ROOT, ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(300)

JS = ROOT / "clients" / "js"
VENDOR = ROOT / "server" / "static" / "vendor"
MSGPACK = JS / "node_modules" / "@msgpack" / "msgpack"


def _installed() -> None:
    if shutil.which("node") is None:
        pytest.fail("node is not installed (Node 20 or later is needed for clients/js)")
    if not (JS / "node_modules" / "ws").is_dir() or not MSGPACK.is_dir():
        pytest.fail("clients/js/node_modules is missing: run scripts/setup-js")


def _files(root: Path, suffix: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(f"*{suffix}"))}


def test_node_suite_against_the_server(server: ServerProcess) -> None:
    _installed()
    env = {**os.environ, "SHOAL_URL": server.url}
    # The files by name: given a directory, Node 20 runs every .js in it (helpers too).
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    assert len(files) >= 6, files
    run = subprocess.run(
        ["node", "--test", "--test-reporter=tap", *files],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    assert "\n# fail 0\n" in output and "\n# pass 0\n" not in output, output[-4000:]


def test_the_page_loads_the_package_modules_unchanged() -> None:
    source = _files(JS / "src", ".js")
    copy = _files(VENDOR / "shoal-client", ".js")
    assert source, "clients/js/src has no modules"
    stale = sorted(name for name in source.keys() | copy.keys() if source.get(name) != copy.get(name))
    assert not stale, (
        f"server/static/vendor/shoal-client differs from clients/js/src in {stale}: run `npm run vendor` in clients/js"
    )


def test_the_vendored_msgpack_is_the_locked_package() -> None:
    _installed()
    lock = json.loads((JS / "package-lock.json").read_text())
    locked = lock["packages"]["node_modules/@msgpack/msgpack"]["version"]
    installed = json.loads((MSGPACK / "package.json").read_text())["version"]
    assert installed == locked, "node_modules is not what the lock file pins: run scripts/setup-js"
    assert f"| {locked} " in (VENDOR / "README.md").read_text(), "server/static/vendor/README.md names another version"
    expected = _files(MSGPACK / "dist.esm", ".mjs")
    assert _files(VENDOR / "msgpack", ".mjs") == expected, "run `npm run vendor` in clients/js"


def test_the_package_manifest_names_its_entry_and_types() -> None:
    manifest = json.loads((JS / "package.json").read_text())
    assert manifest["name"] == "shoal-client"
    assert manifest["type"] == "module"
    entry = manifest["exports"]["."]
    assert (JS / entry["default"]).is_file() and (JS / entry["types"]).is_file()
    assert manifest["types"] == entry["types"]
    assert set(manifest["dependencies"]) == {"@msgpack/msgpack", "ws"}
    assert "node_modules/" in (JS / ".gitignore").read_text()


API_KEYS = json.dumps(
    [
        {"key": "admin-key", "collections": "*", "access": "admin"},
        {"key": "read-key", "collections": "*", "access": "read"},
    ]
)


def test_node_auth_suite_against_a_server_with_keys() -> None:
    _installed()
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir, env={"SHOAL_API_KEYS": API_KEYS})
    proc.start()
    try:
        run = subprocess.run(
            ["node", "--test", "--test-reporter=tap", "test/auth-server.js"],
            cwd=JS,
            env={**os.environ, "SHOAL_AUTH_URL": proc.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    assert "\n# fail 0\n" in output and "\n# pass 0\n" not in output, output[-4000:]

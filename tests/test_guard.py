"""Browsers, origins and hosts, through real servers: a page on another site or a DNS-rebound name
is refused on HTTP, SSE and the WebSocket alike; curl-like clients (no Origin), loopback pages
and the server's own page are served; HEAD answers only where GET does and never writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest
import websockets
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from websockets.exceptions import InvalidStatus

from models.errors import BadRequest, Forbidden
from server.guard import guard_policy
from server.settings import Settings
from tests.server_process import ServerProcess, local_server, temp_data_dir
from tests.test_browser import CHROMEDRIVER, CHROMIUM, FLAGS

pytestmark = pytest.mark.timeout(180)

FOREIGN = "https://evil.example"
LOOPBACK_ORIGINS = ("http://localhost:3000", "http://127.0.0.1:9", "http://[::1]:8080", "http://localhost")


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def error_code(reply: httpx.Response) -> str:
    assert reply.headers["content-type"] == "application/json", reply.headers
    body = reply.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return str(body["error"]["code"])


async def ws_call(url: str, frame: dict[str, Any], **connect: Any) -> dict[str, Any]:
    async with websockets.connect(url, subprotocols=["shoal.v1"], open_timeout=20, **connect) as ws:  # type: ignore[list-item]
        await ws.send(msgpack.packb(frame, use_bin_type=True))
        reply = msgpack.unpackb(await ws.recv(), raw=False)
    assert isinstance(reply, dict)
    return reply


async def ws_refused(url: str, **connect: Any) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of a refused handshake."""
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(url, subprotocols=["shoal.v1"], open_timeout=20, **connect):  # type: ignore[list-item]
            pass
    response = refused.value.response
    body = json.loads(bytes(response.body or b""))
    assert isinstance(body, dict)
    return response.status_code, body


def named(server: ServerProcess, host: str) -> tuple[str, dict[str, Any]]:
    """A WebSocket URL naming `host` (so the handshake's one Host header is `host`) and the
    connect arguments that still reach the server on 127.0.0.1."""
    port = int(server.url.rsplit(":", 1)[1])
    return f"ws://{host}/v1/ws", {"host": "127.0.0.1", "port": port, "proxy": None}


async def collection_names(http: httpx.AsyncClient) -> list[str]:
    reply = await http.get("/v1/collections")
    assert reply.status_code == 200, reply.text
    return [c["name"] for c in reply.json()["collections"]]


# -- origins ----------------------------------------------------------------------------------


async def test_a_foreign_page_cannot_write_read_or_connect(server: ServerProcess) -> None:
    name = unique("victim")
    async with httpx.AsyncClient(base_url=server.url, timeout=20.0) as http:
        # The cross-site "simple request" a page can send without a CORS preflight.
        body = json.dumps({"name": name, "dim": 2})
        reply = await http.post(
            "/v1/collections", content=body, headers={"origin": FOREIGN, "content-type": "text/plain"}
        )
        assert (reply.status_code, error_code(reply)) == (403, "forbidden")
        assert FOREIGN in reply.json()["error"]["message"]
        assert name not in await collection_names(http)
        reply = await http.get("/v1/collections", headers={"origin": FOREIGN})
        assert (reply.status_code, error_code(reply)) == (403, "forbidden")
        # SSE, as an EventSource on that page would open it.
        assert (await http.post("/v1/collections", json={"name": name, "dim": 2})).status_code == 200
        reply = await http.get(
            f"/v1/collections/{name}/subscribe", params={"vector": "1,0", "threshold": "0"}, headers={"origin": FOREIGN}
        )
        assert (reply.status_code, error_code(reply)) == (403, "forbidden")
        reply = await http.get(f"/v1/collections/{name}/changes", headers={"origin": "null"})
        assert (reply.status_code, error_code(reply)) == (403, "forbidden")
    status, body = await ws_refused(server.ws_url, origin=FOREIGN)
    assert (status, body["error"]["code"]) == (403, "forbidden")
    # Same host, another port or scheme: another origin.
    port = int(server.url.rsplit(":", 1)[1])
    for other in (f"http://evil.example:{port}", "http://192.0.2.1"):
        status, _ = await ws_refused(server.ws_url, origin=other)
        assert status == 403


async def test_clients_without_origin_and_loopback_pages_are_served(server: ServerProcess) -> None:
    name = unique("local")
    async with httpx.AsyncClient(base_url=server.url, timeout=20.0) as http:
        assert (await http.post("/v1/collections", json={"name": name, "dim": 2})).status_code == 200
        for origin in (*LOOPBACK_ORIGINS, server.url):
            reply = await http.post(f"/v1/collections/{name}/count", json={}, headers={"origin": origin})
            assert reply.status_code == 200, (origin, reply.text)
        async with http.stream(
            "GET",
            f"/v1/collections/{name}/subscribe",
            params={"vector": "1,0", "threshold": "0"},
            headers={"origin": "http://localhost:5173"},
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "text/event-stream"
    for origin in (*LOOPBACK_ORIGINS, server.url):
        reply = await ws_call(server.ws_url, {"id": 1, "op": "count", "collection": name}, origin=origin)
        assert reply["ok"] is True and reply["count"] == 0, (origin, reply)
    assert (await ws_call(server.ws_url, {"id": 1, "op": "ping"}))["ok"] is True


# -- hosts ------------------------------------------------------------------------------------


async def test_a_rebound_host_name_is_refused(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=20.0) as http:
        for host in ("rebind.evil.example", "rebind.evil.example:8080", "192.0.2.7"):
            reply = await http.get("/v1/collections", headers={"host": host})
            assert (reply.status_code, error_code(reply)) == (400, "bad_request"), host
        reply = await http.get("/v1/collections/x/changes", headers={"host": "evil.example"})
        assert (reply.status_code, error_code(reply)) == (400, "bad_request")
        # Loopback names with any port, and the bind address, are served.
        for host in ("localhost", "localhost:1", "127.0.0.1:65000", "[::1]:8080", "[::1]", "LOCALHOST"):
            assert (await http.get("/healthz", headers={"host": host})).status_code == 200, host
    url, connect = named(server, "rebind.evil.example")
    status, body = await ws_refused(url, **connect)
    assert (status, body["error"]["code"]) == (400, "bad_request")
    # Two Host (or Origin) headers: which one a proxy used is unknown, so neither is trusted.
    status, body = await ws_refused(server.ws_url, additional_headers={"host": "localhost"})
    assert (status, body["error"]["code"]) == (400, "bad_request")
    with pytest.raises(InvalidStatus) as refused:  # (uvicorn's handshake parser refuses this one itself)
        async with websockets.connect(
            server.ws_url,
            subprotocols=["shoal.v1"],  # type: ignore[list-item]
            origin="http://localhost",
            additional_headers={"origin": FOREIGN},
        ):
            pass
    assert refused.value.response.status_code == 400
    async with httpx.AsyncClient(base_url=server.url, timeout=20.0) as http:
        reply = await http.get("/healthz", headers=[("origin", "http://localhost"), ("origin", FOREIGN)])
        assert (reply.status_code, error_code(reply)) == (400, "bad_request")


@pytest.fixture(scope="module")
def listed_server() -> Iterator[ServerProcess]:
    """A server that names its extra host and origins."""
    env = {
        "SHOAL_ALLOWED_HOSTS": "shoal.test, pinned.test:9999",
        "SHOAL_ALLOWED_ORIGINS": "https://app.example",
        "SHOAL_CORS_ORIGINS": "http://cors.example:8000",
    }
    with local_server(env, quiet=True) as proc:
        yield proc


async def test_listed_hosts_and_origins_are_served(listed_server: ServerProcess) -> None:
    port = int(listed_server.url.rsplit(":", 1)[1])
    own = f"shoal.test:{port}"
    async with httpx.AsyncClient(base_url=listed_server.url, timeout=20.0) as http:
        assert (await http.get("/healthz", headers={"host": own})).status_code == 200
        assert (await http.get("/healthz", headers={"host": "pinned.test:9999"})).status_code == 200
        reply = await http.get("/healthz", headers={"host": "pinned.test:9998"})
        assert (reply.status_code, error_code(reply)) == (400, "bad_request")
        # The page served under that name calls back under that name: same origin.
        same = {"host": own, "origin": f"http://shoal.test:{port}"}
        assert (await http.get("/v1/collections", headers=same)).status_code == 200
        for origin in (f"https://shoal.test:{port}", "http://shoal.test:1", "https://app.example:444"):
            reply = await http.get("/v1/collections", headers={"host": own, "origin": origin})
            assert (reply.status_code, error_code(reply)) == (403, "forbidden"), origin
        for origin in ("https://app.example", "https://APP.example:443", "http://cors.example:8000"):
            assert (await http.get("/v1/collections", headers={"origin": origin})).status_code == 200, origin
    url, connect = named(listed_server, own)
    reply = await ws_call(url, {"id": 1, "op": "ping"}, origin=f"http://shoal.test:{port}", **connect)
    assert reply["ok"] is True
    assert (await ws_call(listed_server.ws_url, {"id": 1, "op": "ping"}, origin="https://app.example"))["ok"] is True
    status, _ = await ws_refused(listed_server.ws_url, origin="https://other.example")
    assert status == 403


async def test_binding_every_interface_without_allowed_hosts_accepts_any_host_and_warns() -> None:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir, {"SHOAL_HOST": "0.0.0.0"})
    try:
        url = proc.start().replace("0.0.0.0", "127.0.0.1")
        async with httpx.AsyncClient(base_url=url, timeout=20.0) as http:
            assert (await http.get("/healthz", headers={"host": "anything.example"})).status_code == 200
            reply = await http.get("/healthz", headers={"host": "anything.example", "origin": FOREIGN})
            assert (reply.status_code, error_code(reply)) == (403, "forbidden")
        assert "SHOAL_ALLOWED_HOSTS unset: any Host header is accepted" in proc.log_tail(200)
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_policy_edge_cases() -> None:
    policy = guard_policy(Settings(allowed_hosts=("[fe80::1]:8080", "Example.COM")))
    assert policy.refusal("http", "example.com:1", None) is None
    assert policy.refusal("http", "[fe80::1]:8080", None) is None
    assert isinstance(policy.refusal("http", "[fe80::1]:8081", None), BadRequest)
    assert policy.refusal("http", None, None) is None  # HTTP/1.0 without Host
    assert policy.refusal("ws", "example.com:8080", "http://example.com:8080") is None
    assert policy.refusal("wss", "example.com", "https://example.com") is None
    assert isinstance(policy.refusal("ws", "example.com", "https://example.com"), Forbidden)
    for bad in ("null", "file://", "http://", "not an origin", "http://a.example/path", "http://[::1"):
        assert isinstance(policy.refusal("http", "localhost", bad), Forbidden), bad
    assert guard_policy(Settings(cors_origins=("*",))).refusal("http", "localhost", FOREIGN) is None
    assert guard_policy(Settings(allowed_hosts=("*",))).refusal("http", "any.example", None) is None


# -- HEAD and methods -------------------------------------------------------------------------


async def test_head_and_get_never_write(server: ServerProcess) -> None:
    name = unique("head")
    doc = json.dumps({"docs": [{"id": "a", "vector": [1.0, 0.0]}]})
    json_type = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url, timeout=20.0) as http:
        assert (await http.post("/v1/collections", json={"name": name, "dim": 2})).status_code == 200
        assert (await http.post(f"/v1/collections/{name}/upsert", content=doc, headers=json_type)).status_code == 200

        async def count() -> int:
            reply = await http.post(f"/v1/collections/{name}/count", json={})
            assert reply.status_code == 200, reply.text
            return int(reply.json()["count"])

        more = json.dumps({"docs": [{"id": "b", "vector": [0.0, 1.0]}]})
        for method in ("HEAD", "GET", "PUT"):
            reply = await http.request(method, f"/v1/collections/{name}/upsert", content=more, headers=json_type)
            assert reply.status_code == 405 and reply.headers["allow"] == "POST", method
            reply = await http.request(
                method, f"/v1/collections/{name}/delete", content='{"ids": ["a"]}', headers=json_type
            )
            assert reply.status_code == 405, method
            if method != "HEAD":
                assert error_code(reply) == "method_not_allowed"
        assert await count() == 1
        created = unique("headmade")
        reply = await http.request(
            "HEAD", "/v1/collections", content=json.dumps({"name": created, "dim": 2}), headers=json_type
        )
        assert reply.status_code == 200 and reply.content == b""  # HEAD of the list, not a create
        reply = await http.put("/v1/collections", content=json.dumps({"name": created, "dim": 2}), headers=json_type)
        assert (reply.status_code, error_code(reply)) == (405, "method_not_allowed")
        assert created not in await collection_names(http)
        for method in ("HEAD", "GET", "POST"):
            reply = await http.request(method, f"/v1/collections/{name}")
            assert reply.status_code == 405 and reply.headers["allow"] == "DELETE", method
        assert name in await collection_names(http) and await count() == 1
        # HEAD where GET is: the same status and headers, no body, and no stream left open.
        for path in ("/healthz", "/readyz", "/metrics", "/", "/v1/collections"):
            reply = await http.head(path)
            assert reply.status_code == 200 and reply.content == b"", path
        reply = await http.head(f"/v1/collections/{name}/subscribe", params={"vector": "1,0", "threshold": "0.5"})
        assert reply.status_code == 200 and reply.headers["content-type"] == "text/event-stream"
        assert (await http.head(f"/v1/collections/{name}/changes")).status_code == 200
        assert (await http.head("/v1/collections/nosuch/changes")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405


# -- a real browser ---------------------------------------------------------------------------


@pytest.fixture
def mapped_browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium (as in test_browser) resolving shoal.test and rebind.test to 127.0.0.1:
    a page under a name of its own, and a DNS-rebinding page, without any DNS."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup-browser (Debian chromium + chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    profile = tempfile.mkdtemp(prefix="shoal-chromium-", dir="/tmp")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument("--host-resolver-rules=MAP shoal.test 127.0.0.1, MAP rebind.test 127.0.0.1")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# Run in the page: open a WebSocket to `url`; "open" or "refused".
TRY_WEBSOCKET = """
const [url, done] = arguments;
const ws = new WebSocket(url, ["shoal.v1"]);
ws.onopen = () => { ws.close(); done("open"); };
ws.onerror = () => done("refused");
"""
# Run in the page: the text/plain POST any page may send to any address (no preflight).
TRY_POST = """
const [url, body, done] = arguments;
fetch(url, {method: "POST", mode: "no-cors", headers: {"content-type": "text/plain"}, body})
  .then(() => done("sent"), () => done("failed"));
"""


async def test_a_page_under_another_name_is_served_but_cannot_reach_the_loopback_address(
    listed_server: ServerProcess, mapped_browser: webdriver.Chrome
) -> None:
    port = int(listed_server.url.rsplit(":", 1)[1])
    name = unique("page")
    async with httpx.AsyncClient(base_url=listed_server.url, timeout=20.0) as http:
        assert (await http.post("/v1/collections", json={"name": name, "dim": 2})).status_code == 200
    browser = mapped_browser
    browser.set_script_timeout(20)
    wait = WebDriverWait(browser, 30)
    # The page under the server's own (allowed) name works: its WebSocket is same-origin.
    browser.get(f"http://shoal.test:{port}/")
    assert browser.title == "Shoal"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#collection option[value='{name}']"))
    assert browser.execute_async_script(TRY_WEBSOCKET, f"ws://shoal.test:{port}/v1/ws") == "open"
    # From that page, the loopback address is another origin: refused on both paths.
    assert browser.execute_async_script(TRY_WEBSOCKET, f"ws://127.0.0.1:{port}/v1/ws") == "refused"
    stolen = unique("stolen")
    body = json.dumps({"name": stolen, "dim": 2})
    browser.execute_async_script(TRY_POST, f"http://127.0.0.1:{port}/v1/collections", body)
    async with httpx.AsyncClient(base_url=listed_server.url, timeout=20.0) as http:
        assert stolen not in await collection_names(http)
    # A rebound name: the page never loads.
    browser.get(f"http://rebind.test:{port}/")
    assert browser.title != "Shoal"
    assert "DNS-rebinding" in browser.find_element(By.TAG_NAME, "body").text


def test_wildcard_bind_policy_warns_unless_hosts_are_named(caplog: pytest.LogCaptureFixture) -> None:
    for bind in ("0.0.0.0", "::"):
        caplog.clear()
        assert guard_policy(Settings(host=bind)).refusal("http", "any.example", None) is None
        assert "SHOAL_ALLOWED_HOSTS unset" in caplog.text
    caplog.clear()
    named_policy = guard_policy(Settings(host="0.0.0.0", allowed_hosts=("shoal.lan",)))
    assert not caplog.text
    assert named_policy.refusal("http", "shoal.lan:8080", None) is None
    assert isinstance(named_policy.refusal("http", "any.example", None), BadRequest)
    assert guard_policy(Settings(host="192.0.2.5")).refusal("http", "192.0.2.5:8080", None) is None

"""Failed authentications are limited per client address (with `SHOAL_RATE_LIMIT` off), on HTTP,
SSE and the WebSocket; a WebSocket closes after repeated failed `auth` ops; `/metrics` needs a
key that may read it; SSE endpoints authenticate before they look at their parameters.

Every test speaks from its own loopback address (127.0.0.x, all of which reach the server on
127.0.0.1), so the failures one test spends do not limit another."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgpack
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from models.errors import RateLimited
from server.auth import AuthFailures, failure_address
from server.settings import Settings
from tests.server_process import ServerProcess, local_server

pytestmark = pytest.mark.timeout(180)

BURST = 3
PER_MINUTE = 60  # one failure a second once the burst is spent
WS_CLOSE_AFTER = 5
KEYS = [
    {"key": "admin-key", "collections": "*", "access": "admin"},
    {"key": "reader-key", "collections": ["docs"], "access": "read"},
    {"key": "scraper-key", "collections": [], "access": "read", "metrics": True},
]


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[ServerProcess]:
    env = {
        "SHOAL_API_KEYS": json.dumps(KEYS),
        "SHOAL_AUTH_FAILURE_BURST": str(BURST),
        "SHOAL_AUTH_FAILURES_PER_MINUTE": str(PER_MINUTE),
        "SHOAL_WS_AUTH_FAILURES_CLOSE": str(WS_CLOSE_AFTER),
    }
    with local_server(env, quiet=True) as proc:
        yield proc


@asynccontextmanager
async def http_from(server: ServerProcess, address: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=server.url, transport=transport, timeout=20.0) as http:
        yield http


def ws_from(server: ServerProcess, address: str, **kwargs: Any) -> Any:
    return websockets.connect(
        server.ws_url,
        subprotocols=["shoal.v1"],  # type: ignore[list-item]
        local_addr=(address, 0),
        open_timeout=20,
        **kwargs,
    )


async def call(ws: ClientConnection, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(msgpack.packb(frame, use_bin_type=True))
    reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 20), raw=False)
    assert isinstance(reply, dict)
    return reply


def error_of(reply: httpx.Response) -> dict[str, Any]:
    assert reply.headers["content-type"] == "application/json", reply.text
    error = reply.json()["error"]
    assert isinstance(error, dict)
    return error


async def test_http_failures_are_limited_per_address(keyed_server: ServerProcess) -> None:
    async with http_from(keyed_server, "127.0.0.2") as guesser, http_from(keyed_server, "127.0.0.3") as other:
        for i in range(BURST):
            reply = await guesser.get("/v1/collections", headers={"authorization": f"Bearer guess-{i}"})
            assert (reply.status_code, error_of(reply)["code"]) == (401, "unauthorized")
        reply = await guesser.get("/v1/collections", headers={"authorization": "Bearer guess-x"})
        error = error_of(reply)
        assert (reply.status_code, error["code"]) == (429, "rate_limited")
        assert 0 < error["retry_after_ms"] <= 60_000 / PER_MINUTE + 1
        # Locked out, a right key is refused too: the answer must not tell a guesser it is right.
        reply = await guesser.get("/v1/collections", headers={"authorization": "Bearer admin-key"})
        assert (reply.status_code, error_of(reply)["code"]) == (429, "rate_limited")
        # Without a key there is nothing to guess: still 401, and no failure spent.
        assert (await guesser.get("/v1/collections")).status_code == 401
        # Another address is not affected.
        assert (await other.get("/v1/collections", headers={"authorization": "Bearer admin-key"})).status_code == 200
        await asyncio.sleep(error_of(reply)["retry_after_ms"] / 1000 + 0.05)
        assert (await guesser.get("/v1/collections", headers={"authorization": "Bearer admin-key"})).status_code == 200


async def test_a_forwarded_for_header_does_not_buy_fresh_guesses(keyed_server: ServerProcess) -> None:
    """No proxy is trusted by default (SHOAL_FORWARDED_ALLOW_IPS empty): a guesser on loopback
    that names another address in X-Forwarded-For is still counted as itself."""
    async with http_from(keyed_server, "127.0.0.9") as guesser:
        codes = []
        for i in range(BURST + 2):
            headers = {"authorization": f"Bearer guess-{i}", "x-forwarded-for": f"10.9.8.{i}"}
            codes.append((await guesser.get("/v1/collections", headers=headers)).status_code)
        assert codes == [401] * BURST + [429, 429], codes


async def test_one_websocket_gets_a_few_guesses_then_is_closed(keyed_server: ServerProcess) -> None:
    codes = []
    async with ws_from(keyed_server, "127.0.0.4") as ws:
        for i in range(WS_CLOSE_AFTER):
            reply = await call(ws, {"id": i, "op": "auth", "key": f"guess-{i}"})
            codes.append(reply["error"]["code"])
            if reply["error"]["code"] == "rate_limited":
                assert reply["error"]["retry_after_ms"] > 0
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await call(ws, {"id": 99, "op": "auth", "key": "guess-99"})
    assert codes == ["unauthorized"] * BURST + ["rate_limited"] * (WS_CLOSE_AFTER - BURST)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    # A new connection from that address is still limited, whatever it presents.
    async with ws_from(keyed_server, "127.0.0.4") as ws:
        reply = await call(ws, {"id": 1, "op": "auth", "key": "admin-key"})
        assert reply["error"]["code"] == "rate_limited"
    # The handshake's Authorization header spends failures the same way (and never crashes).
    async with ws_from(keyed_server, "127.0.0.5", additional_headers={"authorization": "Bearer nope"}) as ws:
        assert (await call(ws, {"id": 1, "op": "list_collections"}))["error"]["code"] == "unauthorized"
        later = [(await call(ws, {"id": i, "op": "auth", "key": f"g{i}"}))["error"]["code"] for i in range(BURST)]
        assert later == ["unauthorized"] * (BURST - 1) + ["rate_limited"]
    async with ws_from(keyed_server, "127.0.0.6") as ws:
        assert (await call(ws, {"id": 1, "op": "auth", "key": "admin-key"}))["ok"] is True
        assert (await call(ws, {"id": 2, "op": "create_collection", "name": "docs", "dim": 2}))["ok"] is True


async def test_sse_authenticates_first_and_limits_failures(keyed_server: ServerProcess) -> None:
    async with http_from(keyed_server, "127.0.0.7") as http:
        assert (await http.post("/v1/collections", json={"name": "docs", "dim": 2, "if_not_exists": True},
                                headers={"authorization": "Bearer admin-key"})).status_code == 200  # fmt: skip
        bad = {"vector": "1,0", "threshold": "0.5", "colour": "red"}
        # A bad parameter tells an unauthenticated caller nothing: 401 first, then 403, then 400.
        reply = await http.get("/v1/collections/docs/subscribe", params=bad)
        assert (reply.status_code, error_of(reply)["code"]) == (401, "unauthorized")
        reply = await http.get("/v1/collections/secret/subscribe", params={**bad, "key": "reader-key"})
        assert (reply.status_code, error_of(reply)["code"]) == (403, "forbidden")
        reply = await http.get("/v1/collections/docs/subscribe", params={**bad, "key": "reader-key"})
        assert (reply.status_code, error_of(reply)["code"]) == (400, "bad_request")
        reply = await http.get("/v1/collections/docs/changes", params={"last_event_id": "x"})
        assert (reply.status_code, error_of(reply)["code"]) == (401, "unauthorized")
        reply = await http.get("/v1/collections/docs/changes", params={"last_event_id": "x", "key": "reader-key"})
        assert (reply.status_code, error_of(reply)["code"]) == (400, "bad_request")
        # Wrong keys, as an EventSource passes them.
        for i in range(BURST):
            reply = await http.get("/v1/collections/docs/changes", params={"key": f"guess-{i}"})
            assert reply.status_code == 401
        reply = await http.get("/v1/collections/docs/changes", params={"key": "reader-key"})
        error = error_of(reply)
        assert (reply.status_code, error["code"]) == (429, "rate_limited") and error["retry_after_ms"] > 0


async def test_metrics_need_a_metrics_key(keyed_server: ServerProcess) -> None:
    async with http_from(keyed_server, "127.0.0.8") as http:
        reply = await http.get("/metrics")
        assert (reply.status_code, error_of(reply)["code"]) == (401, "unauthorized")
        reply = await http.get("/metrics", headers={"authorization": "Bearer reader-key"})
        assert (reply.status_code, error_of(reply)["code"]) == (403, "forbidden")
        for key in ("scraper-key", "admin-key"):
            reply = await http.get("/metrics", headers={"authorization": f"Bearer {key}"})
            assert reply.status_code == 200 and "shoal_requests_total" in reply.text, key
        # The metrics key reads nothing else.
        reply = await http.post("/v1/collections/docs/count", json={}, headers={"authorization": "Bearer scraper-key"})
        assert (reply.status_code, error_of(reply)["code"]) == (403, "forbidden")


@pytest.fixture(scope="module")
def default_limits_server() -> Iterator[ServerProcess]:
    """Keys on, every limit at its default (and `SHOAL_RATE_LIMIT` off, its default)."""
    with local_server({"SHOAL_API_KEYS": json.dumps(KEYS)}, quiet=True) as proc:
        yield proc


async def test_failures_are_limited_by_default(default_limits_server: ServerProcess) -> None:
    defaults = Settings()
    assert defaults.rate_limit == 0, "the failure limit must hold with the request limit off"
    burst, close_after = int(defaults.auth_failure_burst), defaults.ws_auth_failures_close
    async with http_from(default_limits_server, "127.0.0.10") as guesser:
        codes = [
            (await guesser.get("/v1/collections", headers={"authorization": f"Bearer guess-{i}"})).status_code
            for i in range(burst + 2)
        ]
        assert codes == [401] * burst + [429, 429], codes
    async with ws_from(default_limits_server, "127.0.0.11") as ws:
        replies = [
            (await call(ws, {"id": i, "op": "auth", "key": f"guess-{i}"}))["error"]["code"] for i in range(close_after)
        ]
        assert replies.count("unauthorized") == min(burst, close_after), replies
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await call(ws, {"id": 99, "op": "auth", "key": "guess-99"})
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_failures_count_against_an_ipv6_slash_64_and_plain_ipv4() -> None:
    assert failure_address("192.0.2.7") == "192.0.2.7"
    assert failure_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert failure_address("2001:db8:1:2:aaaa::1") == failure_address("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert failure_address("2001:db8:1:3::1") != failure_address("2001:db8:1:2::1")
    assert failure_address("::1") == "::1" and failure_address("-") == "-"
    failures = AuthFailures(per_minute=60, burst=2)
    failures.failed("2001:db8::1")
    failures.failed("2001:db8::2")
    with pytest.raises(RateLimited):
        failures.admit("2001:db8::3")
    failures.admit("2001:db8:0:1::1")
    failures.admit("192.0.2.7")

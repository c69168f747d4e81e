"""The error contract everywhere: HTTP errors outside the API routes, the WebSocket handshake,
typed subscription ends, and actors that refuse messages they do not handle.

End-to-end parts run against the session's real server; the actor parts run each actor alone
and send it a message of a type it has no branch for, through its own mailbox.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from typing import Any, cast

import anyio
import httpx
import msgpack
import numpy as np
import pytest
import websockets
from httpx_sse import aconnect_sse
from numpy.typing import NDArray
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from actors.embedder import Embedder
from actors.ingest import Ingest
from actors.onnx_model import TokenIds
from actors.read_pool import ReadPool
from actors.shard import Shard
from actors.subscriber import EndReason, Subscriber
from actors.subscriptions import Subscriptions
from models.config import EngineConfig
from models.errors import ALL_ERRORS, BadRequest, Unavailable
from models.records import MODEL_DIM, Metric
from server.app import EXCEPTION_HANDLERS
from server.ws import refuse_handshake
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(120)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


# --- HTTP: every error has the JSON body ------------------------------------------------------


async def test_unknown_paths_answer_not_found_json(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        for path in ("/nope", "/v1", "/v1/collections/a/b/c", "/static/missing.js", "/v1/ws/extra"):
            response = await http.get(path)
            assert response.status_code == 404, (path, response.text)
            assert error_of(response)["code"] == "not_found", path


async def test_wrong_methods_answer_method_not_allowed_with_allow(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        for method, path, allowed in (
            ("DELETE", "/v1/collections", {"GET", "POST", "HEAD"}),
            ("PUT", "/v1/collections/some", {"DELETE"}),
            ("POST", "/healthz", {"GET", "HEAD"}),
            ("POST", "/metrics", {"GET", "HEAD"}),
            ("DELETE", "/v1/collections/some/query", {"POST"}),
        ):
            response = await http.request(method, path)
            assert response.status_code == 405, (method, path, response.text)
            error = error_of(response)
            assert error["code"] == "method_not_allowed" and method in error["message"]
            assert {m.strip() for m in response.headers["allow"].split(",")} == allowed, (path, response.headers)
        # The API's own formats hold here too: msgpack when asked for.
        response = await http.request("PUT", "/v1/collections", headers={"accept": "application/msgpack"})
        assert response.status_code == 405
        assert msgpack.unpackb(response.content)["error"]["code"] == "method_not_allowed"
        # And the server is still fine.
        assert (await http.get("/healthz")).json() == {"status": "ok"}


def test_the_error_table_gives_every_code_one_status() -> None:
    statuses = {cls.code: cls.http_status for cls in ALL_ERRORS}
    assert statuses["method_not_allowed"] == 405 and statuses["not_found"] == 404
    assert len(statuses) == len(ALL_ERRORS)


def test_an_unexpected_exception_answers_internal_without_details() -> None:
    """The catch-all handler, wired exactly as the server wires it, behind a route that breaks."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("secret path /etc/shadow")

    app = Starlette(routes=[Route("/broken", broken)], exception_handlers=EXCEPTION_HANDLERS)
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.get("/broken")
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal", "message": "internal error"}}
    assert "secret" not in response.text


# --- WebSocket: the subprotocol is required --------------------------------------------------


async def test_websocket_without_the_subprotocol_is_refused(server: ServerProcess) -> None:
    for offered in (None, ["other.v2"]):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(server.ws_url, subprotocols=offered, open_timeout=10):  # type: ignore[arg-type]
                pass
        response = refused.value.response
        assert response.status_code == 400, offered
        body = json.loads(response.body)
        assert body["error"]["code"] == "bad_request" and "shoal.v1" in body["error"]["message"]
    # Offering it among others is accepted, with shoal.v1 chosen.
    subprotocols = [websockets.Subprotocol("other.v2"), websockets.Subprotocol("shoal.v1")]
    async with websockets.connect(server.ws_url, subprotocols=subprotocols) as ws:
        assert ws.subprotocol == "shoal.v1"
        await ws.send(msgpack.packb({"id": 1, "op": "ping"}))
        assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10)) == {"id": 1, "ok": True}


async def test_a_server_without_handshake_responses_gets_a_close_before_accept() -> None:
    """Where the ASGI server cannot send an HTTP response to a handshake, the refusal is a close
    sent before any accept (the server answers it with 403)."""
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    await refuse_handshake({"type": "websocket", "extensions": {}}, send, BadRequest("offer 'shoal.v1'"))
    assert [m["type"] for m in sent] == ["websocket.close"] and sent[0]["code"] == 1008
    sent.clear()
    await refuse_handshake({"type": "websocket", "extensions": {"websocket.http.response": {}}}, send, BadRequest("x"))
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["error"]["code"] == "bad_request"


# --- typed subscription ends ---------------------------------------------------------------


async def test_ended_push_and_sse_error_carry_the_end_reasons_error(server: ServerProcess) -> None:
    """The wire format of a server-side end: `ended` with code and reason, SSE `event: error`."""
    name = unique("ends")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.post("/v1/collections", json={"name": name, "dim": 2})).status_code == 200
        subprotocols = [websockets.Subprotocol("shoal.v1")]
        async with (
            websockets.connect(server.ws_url, subprotocols=subprotocols) as ws,
            aconnect_sse(http, "GET", f"/v1/collections/{name}/changes") as stream,
        ):
            frame = {"id": 1, "op": "subscribe", "collection": name, "vector": [1.0, 0.0], "threshold": 0.0}
            await ws.send(msgpack.packb(frame))
            reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
            assert reply["ok"] is True, reply
            events = stream.aiter_sse()
            assert (await http.delete(f"/v1/collections/{name}")).status_code == 200
            ended = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
            assert ended == {"event": "ended", "sub": reply["sub"], "code": "not_found", "reason": "collection dropped"}
            async with asyncio.timeout(10):
                async for event in events:
                    if event.event == "error":
                        break
            assert json.loads(event.data) == {"error": {"code": "not_found", "message": "collection dropped"}}


def _subscriber() -> Subscriber:
    collection = cast(Any, type("C", (), {"name": "c", "metric": Metric.COSINE}))
    return Subscriber("s1", collection, "changes", None, frozenset(), 4, close_on_overflow=True)


@pytest.mark.parametrize(
    ("reason", "code", "message"),
    [
        (EndReason.UNSUBSCRIBED, None, None),
        (EndReason.CONNECTION_CLOSED, None, None),
        (EndReason.DISCONNECTED, None, None),
        (EndReason.LAGGED, "overloaded", "lagged"),
        (EndReason.COLLECTION_DROPPED, "not_found", "collection dropped"),
        (EndReason.SERVER_STOPPING, "unavailable", "server shutting down"),
        (EndReason.FORBIDDEN, "forbidden", "the key no longer allows this subscription"),
        (EndReason.INTERNAL, "internal", "internal error"),
    ],
)
def test_each_end_reason_is_told_with_its_error(reason: EndReason, code: str | None, message: str | None) -> None:
    sub = _subscriber()
    sub.close(reason)
    assert sub.reason is reason and sub.code == code
    assert (sub.error.message if sub.error else None) == message
    assert reason.silent == (code is None)
    sub.close(EndReason.INTERNAL)  # idempotent: the first end stays
    assert sub.reason is reason


def test_a_failed_replay_is_told_with_the_replays_own_code() -> None:
    sub = _subscriber()
    sub.close(EndReason.REPLAY_FAILED, Unavailable("database unavailable"))
    assert sub.code == "unavailable" and sub.error is not None
    assert sub.error.message == "replay failed: database unavailable"
    bare = _subscriber()
    bare.close(EndReason.REPLAY_FAILED)
    assert bare.code == "internal"


def test_an_overflowing_feed_ends_lagged() -> None:
    sub = _subscriber()
    sub.lag(3)
    assert sub.reason is EndReason.LAGGED
    assert str(sub.reason) == "lagged"  # the value is what the client reads


# --- actors refuse messages they do not handle -------------------------------------------------


class _Unknown:
    """A message no actor has a branch for."""


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _assert_refused(info: pytest.ExceptionInfo[BaseException], actor: str) -> None:
    leaves = _leaves(info.value)
    assert any(isinstance(e, TypeError) and actor in str(e) and "_Unknown" in str(e) for e in leaves), leaves


async def test_the_shard_refuses_an_unknown_message() -> None:
    with ReadPool(1).running() as pool:
        shard = Shard(2, Metric.COSINE, EngineConfig(), pool)
        with pytest.raises(BaseException) as info:
            async with anyio.create_task_group() as tg:
                await tg.start(shard.run)
                await shard._mailbox.send(cast(Any, _Unknown()))
                with anyio.fail_after(10):
                    await anyio.sleep_forever()
    _assert_refused(info, "shard")
    # It answered nothing by mistake, and what comes after is refused cleanly.
    with pytest.raises(Unavailable):
        await shard.count()


async def test_the_ingest_pipeline_refuses_an_unknown_message() -> None:
    ingest = Ingest(EngineConfig(), cast(Any, None), cast(Any, None), cast(Any, None))
    with pytest.raises(BaseException) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(ingest.run)
            await ingest._mailbox.send(cast(Any, _Unknown()))
            with anyio.fail_after(10):
                await anyio.sleep_forever()
    _assert_refused(info, "ingest")
    # The committer's own dispatch refuses it too (it would not fall into "drop collection").
    with pytest.raises(TypeError, match=r"ingest committer.*_Unknown"):
        await ingest._commit(cast(Any, _Unknown()))


async def test_the_subscriptions_actor_refuses_an_unknown_message() -> None:
    subscriptions = Subscriptions(cast(Any, None))
    with pytest.raises(BaseException) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(subscriptions.run)
            await subscriptions._send.send(cast(Any, _Unknown()))
            with anyio.fail_after(10):
                await anyio.sleep_forever()
    _assert_refused(info, "subscriptions")


class _ZeroModel:
    """A stand-in model: the embedder never reaches it in this test."""

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        return [np.array([1], dtype=np.int64) for _ in texts]

    def encode_ids(self, rows: Sequence[TokenIds]) -> NDArray[np.float32]:
        return np.zeros((len(rows), MODEL_DIM), dtype=np.float32)


async def test_the_embedder_refuses_an_unknown_message() -> None:
    embedder = Embedder(EngineConfig(), model_factory=_ZeroModel)
    with pytest.raises(BaseException) as info:
        async with anyio.create_task_group() as tg:
            await tg.start(embedder.run)
            embedder._queries.offer(cast(Any, _Unknown()))
            embedder._bell.set()
            with anyio.fail_after(10):
                await anyio.sleep_forever()
    _assert_refused(info, "embedder")
    with pytest.raises(Unavailable):
        await embedder.embed_query("after the refusal")

"""Async Python client of Shoal.

    from shoal_client import ShoalClient, NotFound

    async with ShoalClient.connect("ws://127.0.0.1:8080/v1/ws") as db:
        await db.create_collection("docs", if_not_exists=True)
        await db.upsert("docs", [{"id": "a", "text": "hello world"}])
        result = await db.query("docs", text="greeting", k=5)
        async with await db.subscribe("docs", text="greeting", threshold=0.5) as sub:
            async for event in sub:
                ...

`ShoalHTTP` offers the same typed methods over the HTTP JSON API; `subscribe_sse` and
`changes_sse` stream Server-Sent Events.
"""

from shoal_client.errors import (
    BadFrame,
    BadRequest,
    ClientError,
    ConnectionClosed,
    DimensionMismatch,
    Exists,
    Forbidden,
    Gone,
    Internal,
    InvalidVector,
    NotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    ShoalError,
    TooLarge,
    Unauthorized,
    Unavailable,
    UnknownOp,
)
from shoal_client.http import ShoalHTTP
from shoal_client.sse import changes_sse, subscribe_sse
from shoal_client.types import (
    CollectionInfo,
    DeleteResult,
    Hit,
    LaggedEvent,
    LeaveEvent,
    MatchEvent,
    Page,
    QueryResult,
    SideScores,
    SSEEvent,
    SubscriptionEvent,
    TopkEvent,
    UpsertResult,
)
from shoal_client.ws import ShoalClient, Subscription

__all__ = [
    "BadFrame",
    "BadRequest",
    "ClientError",
    "CollectionInfo",
    "ConnectionClosed",
    "DeleteResult",
    "DimensionMismatch",
    "Exists",
    "Forbidden",
    "Gone",
    "Hit",
    "Internal",
    "InvalidVector",
    "LaggedEvent",
    "LeaveEvent",
    "MatchEvent",
    "NotFound",
    "Overloaded",
    "Page",
    "ProtocolError",
    "QueryResult",
    "RateLimited",
    "SSEEvent",
    "ShoalClient",
    "ShoalError",
    "ShoalHTTP",
    "SideScores",
    "Subscription",
    "SubscriptionEvent",
    "TooLarge",
    "TopkEvent",
    "Unauthorized",
    "Unavailable",
    "UnknownOp",
    "UpsertResult",
    "changes_sse",
    "subscribe_sse",
]

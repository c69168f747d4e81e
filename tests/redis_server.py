"""A real `redis-server` on a free loopback port for the broker-source tests (see `load.redis_server`)."""

from __future__ import annotations

from load.redis_server import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]

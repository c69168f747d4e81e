"""What a broker source is configured with and what it reports (GET /v1/sources, /metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from models.config import EngineConfig


class SourceState(StrEnum):
    STARTING = "starting"
    CLAIMING = "claiming"
    RUNNING = "running"
    RETRYING = "retrying"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class SourceConfig:
    read_batch: int
    max_in_flight: int
    block_ms: int
    claim_idle_ms: int
    notify_maxlen: int
    retry_initial_s: float
    retry_max_s: float
    timeout_s: float

    @classmethod
    def of(cls, config: EngineConfig) -> SourceConfig:
        return cls(
            read_batch=config.source_read_batch,
            max_in_flight=config.source_max_in_flight,
            block_ms=config.source_block_ms,
            claim_idle_ms=config.source_claim_idle_ms,
            notify_maxlen=config.source_notify_maxlen,
            retry_initial_s=config.source_retry_initial_s,
            retry_max_s=config.source_retry_max_s,
            timeout_s=config.source_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """One source as operators see it (GET /v1/sources, /metrics)."""

    url: str
    stream: str
    group: str
    consumer: str
    notify: str
    state: SourceState
    processed: int
    rejected: int
    skipped: int
    retries: int
    lag: int | None
    in_flight: int
    max_in_flight: int
    position: str
    last_error: str | None
    last_error_at: float | None

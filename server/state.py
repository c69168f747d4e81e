"""What the edge shares across requests: settings, metrics and the running engine."""

from __future__ import annotations

from dataclasses import dataclass

from actors.supervisor import Engine
from server.auth import Authenticator
from server.metrics import Metrics
from server.settings import Settings


@dataclass(slots=True)
class AppState:
    settings: Settings
    metrics: Metrics
    engine: Engine
    auth: Authenticator

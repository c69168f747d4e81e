"""Side virtualenvs for the tools `load.compare` runs but Shoal must not depend on (Chroma,
matplotlib): created with `python -m venv` under `~/.cache/shoal/venvs/<name>` (or under
`$SHOAL_CACHE_DIR`), filled with pip, reused while their marker file names the same packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from load.common import log
from load.corpus import cache_root


class SideVenvError(RuntimeError):
    """The side virtualenv could not be made (no venv module, pip failed, package won't import)."""


def venv_root(name: str) -> Path:
    return cache_root().parent / "venvs" / name


def _run(args: list[str], timeout: float) -> None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SideVenvError(f"{' '.join(args[:4])} ... timed out after {timeout:.0f}s") from exc
    except OSError as exc:
        raise SideVenvError(f"{args[0]}: {exc}") from exc
    if done.returncode != 0:
        # pip's warnings come first; the error is at the end.
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise SideVenvError(f"{' '.join(args[:4])} ... exited {done.returncode}:\n{tail}")


def ensure_venv(name: str, packages: list[str], imports: list[str], timeout: float = 900.0) -> Path:
    """The python of side venv `name` holding `packages`, each of `imports` importable.

    Raises SideVenvError with the reason when it cannot be made.
    """
    root = venv_root(name)
    python = root / "bin" / "python"
    marker = root / ".shoal-venv.json"
    wanted = {"packages": sorted(packages)}
    try:
        if python.exists() and json.loads(marker.read_text()) == wanted:
            return python
    except (OSError, ValueError):
        pass
    if not python.exists():
        log(f"creating side virtualenv {root}")
        root.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(root)], 300)
    log(f"installing {' '.join(packages)} into {root} (once; reused afterwards)")
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *packages], timeout)
    _run([str(python), "-c", "; ".join(f"import {m}" for m in imports)], 300)
    marker.write_text(json.dumps(wanted))
    return python


def side_env() -> dict[str, str]:
    """The environment for side processes: no telemetry, no Shoal paths on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(ANONYMIZED_TELEMETRY="False", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env

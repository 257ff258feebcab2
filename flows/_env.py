"""Keep Prefect's state out of ``~/.prefect`` unless the user configured Prefect.

Must run before the first ``import prefect``: Prefect reads its settings (and creates its home
folder) at import time. This module imports nothing from Prefect.
"""

from __future__ import annotations

import os
from pathlib import Path

# Any of these in the environment means the user chose where Prefect lives or talks to.
PREFECT_LOCATION_VARIABLES = ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_PROFILES_PATH")

# Seconds a temporary Prefect server may take to answer (Prefect's default is 20 s). It took
# 7-13 s on a loaded 2-core machine and once more than 20 s, which ended a run before any work.
STARTUP_TIMEOUT = 120
STARTUP_TIMEOUT_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def segflow_prefect_home() -> Path:
    """``$XDG_CACHE_HOME/segflow/prefect``, or ``~/.cache/segflow/prefect``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "segflow" / "prefect"


def isolate_prefect() -> None:
    """Point ``PREFECT_HOME`` at a segflow-owned folder unless Prefect is already configured.

    Prefect counts as configured when one of :data:`PREFECT_LOCATION_VARIABLES` is set or a
    ``~/.prefect/profiles.toml`` exists (a user who ran ``prefect profile``/``prefect config
    set`` keeps their server). Telemetry is off by default: the embedded server would
    otherwise try to reach the network. A temporary server may take :data:`STARTUP_TIMEOUT`
    seconds to start unless ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` says otherwise.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(STARTUP_TIMEOUT_VARIABLE, str(STARTUP_TIMEOUT))
    if any(os.environ.get(name) for name in PREFECT_LOCATION_VARIABLES):
        return
    if (Path.home() / ".prefect" / "profiles.toml").exists():
        return
    home = segflow_prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PREFECT_HOME"] = str(home)

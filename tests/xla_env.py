"""XLA_FLAGS for the processes the tests start: the session's flags (conftest) plus a host device count."""
from __future__ import annotations

import os

_COUNT = "--xla_force_host_platform_device_count"


def xla_flags(devices: int = 1) -> str:
    """The calling session's XLA_FLAGS without any device count, plus ``devices`` forced host devices (> 1)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_COUNT)]
    if devices > 1:
        flags.append(f"{_COUNT}={devices}")
    return " ".join(flags)

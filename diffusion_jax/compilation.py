"""Which programs XLA compiled, from jax's own compile log (``jax.log_compiles``), with their compile times.

    with CompileLog() as log:
        draw(params, u0)
    log.count("sampler_")        # programs whose name starts with "sampler_"

Used by the tests that assert "compiles once" and by ``bench-overhead`` to report compile time apart from run time.
"""
from __future__ import annotations

import logging
import re

import jax

_FINISHED = re.compile(r"Finished XLA compilation of (?:jit\()?([^\s)]+)\)? in ([0-9.eE+-]+) sec")


class CompileLog(logging.Handler):
    """Context manager collecting (program name, seconds) of every XLA compilation inside it."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.compiled: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = _FINISHED.search(record.getMessage())
        if m:
            self.compiled.append((m.group(1), float(m.group(2))))

    def __enter__(self) -> "CompileLog":
        self._logger = logging.getLogger("jax._src.dispatch")
        self._old_level = self._logger.level
        self._logger.addHandler(self)
        self._ctx = jax.log_compiles(True)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)

    def count(self, prefix: str = "") -> int:
        """Number of compilations of programs whose name starts with ``prefix``."""
        return sum(1 for name, _ in self.compiled if name.startswith(prefix))

    def seconds(self, prefix: str = "") -> float:
        """Total compile time of those programs."""
        return sum(s for name, s in self.compiled if name.startswith(prefix))

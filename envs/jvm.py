"""Stopping the JVM behind a py4j gateway (ScienceWorld, TextWorld-Express): one way for every Java engine."""

from __future__ import annotations

import logging
import subprocess
from typing import Any

__all__ = ["stop_jvm"]

logger = logging.getLogger(__name__)


def stop_jvm(gateway: Any | None, proc: subprocess.Popen | None) -> None:
    """Shut down ``gateway`` (a py4j ``JavaGateway``; errors of a JVM already gone are ignored), then end its
    Java process ``proc``: SIGTERM, SIGKILL after 10 s, and its pipes closed."""
    if gateway is not None:
        try:
            gateway.shutdown()
        except Exception:  # the JVM may already be gone
            logger.debug("py4j shutdown failed", exc_info=True)
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:  # pragma: no cover - a JVM that ignores SIGTERM
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()

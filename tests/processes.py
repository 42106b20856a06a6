"""Killing a run at a chosen moment, for the resume tests."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_when_written(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (or once it has ended or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

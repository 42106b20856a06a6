"""How much memory this process may still take, and how much it has taken at most."""
from __future__ import annotations

import sys
from pathlib import Path


def available_bytes() -> int | None:
    """Memory this process may still take: the system's available memory, or less where a
    cgroup (a container, a CI job) limits it; None where neither can be read (not Linux)."""
    known = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                known.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            known.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(known) if known else None


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (what the estimate is checked against)."""
    try:
        import resource
    except ImportError:   # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

"""Resident-memory readings from ``/proc/self`` shared by the memory benchmarks (Linux only)."""

from __future__ import annotations


def rss_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (resident high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (``echo 5 > /proc/self/clear_refs``); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

"""What the benchmarks share: a free local port, and a description of the machine they ran on."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(c) for c in fh.read().split())
    except OSError:
        return []
    return out


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (Linux /proc; just ``[pid]`` elsewhere)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 when it is gone or /proc is absent)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # Fields after the parenthesised command name: utime and stime are the 12th and 13th of them.
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def process_tree_cpu(pid: int) -> dict[int, float] | None:
    """CPU seconds of a process and of each of its descendants, by pid, or None where /proc is absent. Compare two
    readings only over the same pids: a process that exits in between takes its CPU seconds with it."""
    if not Path(f"/proc/{pid}/stat").exists():
        return None
    return {p: cpu_s(p) for p in process_tree(pid)}


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "load": load,
    }

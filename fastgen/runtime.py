"""Process-level runtime settings shared by the CLI, benchmarks and trainers: CPU threads."""
from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_num_threads() -> int:
    """Torch CPU threads for a sampling or evaluation run: half the cores, at least 1, at most 4.

    torch's own default (every core) oversubscribes shared machines: on a busy 2-core box
    ``fastgen sample`` ran 9x slower with 2 threads than with 1, with byte-identical output. The
    models fastgen runs on CPU are small, so more than 4 threads buys little.
    """
    return max(1, min(4, available_cores() // 2))


def set_num_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads: ``None`` = :func:`default_num_threads`, ``0`` = leave torch's choice.

    Returns the number of threads torch now uses.
    """
    if threads is None:
        threads = default_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0 = torch's default), got {threads!r}.")
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()

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


def check_device(device) -> str:
    """``device`` as a string if this torch build can use it (``cpu``, ``cuda[:i]``, ``mps``), else ValueError."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: {torch.cuda.device_count()} CUDA device(s).")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available on this machine; use 'cpu'.")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device must be 'cpu', 'cuda[:i]' or 'mps', got {device!r}.")
    return str(dev)

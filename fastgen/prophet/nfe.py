"""Exact forward-pass (NFE) counting for any ``torch.nn.Module``."""
from __future__ import annotations

import torch


class NFECounter:
    """Counts forward passes of a ``torch.nn.Module`` with a forward hook (one call = one NFE, whatever the batch).

    Use as a context manager: ``with NFECounter(pipe.model) as nfe: pipe(...)``; then ``nfe.count``.
    """

    def __init__(self, model: torch.nn.Module):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.count = 0
        self._handle = None

    def _hook(self, module, args, output):
        self.count += 1

    def __enter__(self) -> "NFECounter":
        self.count = 0
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


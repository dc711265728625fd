"""Distillation training: a generic trainer on accelerate over method objects.

- :mod:`.method`: the contract (:class:`Batch`, :class:`DistillMethod`);
- :mod:`.trainer`: :class:`DistillTrainer`, :func:`run_distillation`;
- :mod:`.config`: :class:`DistillConfig` recipes (light: no torch import, for the CLI);
- :mod:`.teacher`, :mod:`.data`, :mod:`.checkpoint`: frozen teacher, real-data stream, atomic checkpoints;
- methods: :mod:`.dmd2` (DMD2), :mod:`.f_distill` (f-distill), :mod:`.agd` (AGD guidance adapters).

Names load on first use, so ``import fastgen.training.config`` does not import torch.
"""
import importlib

_LAZY = {
    "Batch": ".method", "DistillMethod": ".method",
    "DistillTrainer": ".trainer", "run_distillation": ".trainer", "read_run_log": ".trainer", "run_summary": ".trainer",
    "DistillConfig": ".config",
    "Teacher": ".teacher", "load_teacher": ".teacher",
    "AGD": ".agd", "TrajectoryStore": ".agd", "collect_trajectories": ".agd",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

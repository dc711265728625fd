"""Distillation training: a generic trainer on accelerate (:mod:`.trainer`) over method objects
(:mod:`.method` is the contract; DMD2 and f-distill implement it)."""
from .method import Batch, DistillMethod

__all__ = ["Batch", "DistillMethod"]

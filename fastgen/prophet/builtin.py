"""Loader of the built-in ``arith-dlm`` asset (``fastgen.load_builtin("arith-dlm")``) into diffusers'
``LLaDA2Pipeline``."""
from __future__ import annotations

import inspect
from pathlib import Path

BUILTIN_MODEL = "arith-dlm"  # name of the asset for fastgen.load_builtin / fastgen.builtin_path


def load_builtin_dlm(path: str | Path, *, prophet: bool = True, device: str | None = None,
                     **scheduler_kwargs):
    """Load the built-in ``arith-dlm`` folder into a diffusers ``LLaDA2Pipeline``.

    The scheduler is a :class:`ProphetScheduler` (``prophet=True``, config overrides in ``scheduler_kwargs``, e.g.
    ``early_threshold=...``) or the stock ``BlockRefinementScheduler`` (``prophet=False``). Weights load from
    safetensors only.
    """
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline
    from transformers import AutoModelForMaskedLM, PreTrainedTokenizerFast

    from .scheduler import ProphetScheduler

    path = Path(path)
    for sub in ("model", "scheduler", "tokenizer"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path} is not an arith-dlm folder: missing {sub}/.")
    if not prophet and scheduler_kwargs:
        raise ValueError(f"scheduler options {sorted(scheduler_kwargs)} need prophet=True.")
    accepted = set(inspect.signature(ProphetScheduler.__init__).parameters) - {"self"}
    unknown = sorted(set(scheduler_kwargs) - accepted)
    if unknown:
        raise ValueError(f"unknown ProphetScheduler options {unknown}; accepted: {sorted(accepted)}.")
    model = AutoModelForMaskedLM.from_pretrained(path / "model", use_safetensors=True)
    model.eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    base_config = BlockRefinementScheduler.load_config(path / "scheduler")
    if prophet:
        scheduler = ProphetScheduler.from_config(base_config, **scheduler_kwargs)
    else:
        scheduler = BlockRefinementScheduler.from_config(base_config)
    pipe = LLaDA2Pipeline(model=model, scheduler=scheduler, tokenizer=tokenizer)
    if device is not None:
        pipe.to(device)
    return pipe

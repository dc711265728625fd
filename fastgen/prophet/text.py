"""Text generation with diffusers' ``LLaDA2Pipeline`` and Prophet early commit, with exact forward counting: what
``fastgen generate-text`` runs, and the unit of ``fastgen eval prophet``.

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .builtin import BUILTIN_MODEL, load_builtin_dlm
from .criterion import DEFAULT_THRESHOLDS, PROGRESS_MODES, validate_thresholds


@dataclass
class GenerateTextConfig:
    """Options of one generation (:func:`generate_text`, ``fastgen generate-text``)."""

    prompt: str = field(default="Which is larger, 312 or 98? ", metadata={"help": "prompt text"})
    model: str = field(default=BUILTIN_MODEL, metadata={"help": f"'{BUILTIN_MODEL}' or an arith-dlm style folder"})
    prophet: bool = field(default=True, metadata={
        "help": "Prophet early commit (ProphetScheduler); --no-prophet runs the stock BlockRefinementScheduler"})
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS), metadata={
        "help": "gap thresholds per phase (early, mid, late), non-increasing; +inf never commits early"})
    steps: int = field(default=8, metadata={"help": "refinement steps per block"})
    gen_length: int = field(default=24, metadata={"help": "tokens to generate"})
    block_length: int = field(default=8, metadata={"help": "block size (divides --gen-length)"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0 = greedy)"})
    answer_start: int | None = field(default=None, metadata={
        "help": "monitor the 5-token span from this generation position (default: the active block's masks)"})
    progress_mode: str = field(default="block", metadata={
        "help": "phase progress within the block ('block') or over the whole generation ('global', the paper's)"})
    seed: int = field(default=0, metadata={"help": "generator seed"})


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    return value


def validate_text_options(*, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, steps: int = 8, gen_length: int = 24,
                          block_length: int = 8, temperature: float = 0.0, answer_start: int | None = None,
                          progress_mode: str = "block") -> tuple[float, float, float]:
    """Check the options of a ``LLaDA2Pipeline`` generation with Prophet (needs no model); returns the thresholds."""
    thresholds = validate_thresholds(thresholds)
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        _positive_int(name, value)
    if gen_length % block_length:
        raise ValueError(
            f"gen_length must be a multiple of block_length, got gen_length={gen_length} and "
            f"block_length={block_length}."
        )
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    if answer_start is not None and (not isinstance(answer_start, int) or answer_start < 0):
        raise ValueError(f"answer_start must be None or an int >= 0, got {answer_start!r}.")
    if progress_mode not in PROGRESS_MODES:
        raise ValueError(f"progress_mode must be one of {list(PROGRESS_MODES)}, got {progress_mode!r}.")
    return thresholds


def resolve_model_path(model: str | Path | None) -> Path:
    """The built-in model's folder for ``None`` / ``"arith-dlm"``, otherwise ``model`` as an existing folder."""
    from ..builtin import builtin_path

    if model is None or model == BUILTIN_MODEL:
        return builtin_path(BUILTIN_MODEL)
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model must be '{BUILTIN_MODEL}' or a model folder, got {str(model)!r}.")
    return path


def load_text_pipeline(model: str | Path | None = None, *, prophet: bool = True,
                       thresholds: Sequence[float] = DEFAULT_THRESHOLDS, answer_start: int | None = None,
                       progress_mode: str = "block", commit_later_blocks: bool = False,
                       stop_finished_blocks: bool = False):
    """``LLaDA2Pipeline`` for the built-in model (``None`` or ``"arith-dlm"``) or an arith-dlm style folder, with a
    :class:`ProphetScheduler` (``prophet=True``) or the stock ``BlockRefinementScheduler``; progress bar off.
    ``stop_finished_blocks`` skips the post-block forward of blocks the stock rule empties early (see the scheduler)."""
    thresholds = validate_thresholds(thresholds)
    path = resolve_model_path(model)
    kwargs = {}
    if prophet:
        kwargs = dict(early_threshold=thresholds[0], mid_threshold=thresholds[1], late_threshold=thresholds[2],
                      answer_start=answer_start, progress_mode=progress_mode,
                      commit_later_blocks=commit_later_blocks, stop_finished_blocks=stop_finished_blocks)
    pipe = load_builtin_dlm(path, prophet=prophet, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_text(pipe, prompt: str | list[str], *, steps: int, gen_length: int, block_length: int, seed: int = 0,
             temperature: float = 0.0, threshold: float = 1.0) -> dict:
    """One greedy (or sampled) generation with exact forward counting; editing off, no chat template.

    ``prompt`` may be a list (same token length, for batching). Returns ``texts``, ``nfe`` (forward passes counted by
    a hook, the pipeline's post-block forwards included), ``step_budget`` (the pipeline's ``num_timesteps``) and
    ``fired_at_step`` (per row, the global step of Prophet's commit or None; None for the stock scheduler).
    """
    import torch

    from .nfe import NFECounter
    from .scheduler import ProphetScheduler

    scheduler = pipe.scheduler
    if isinstance(scheduler, ProphetScheduler) and scheduler.config.progress_mode == "global":
        # total refinement steps = steps per block x generated blocks (the pipeline's num_timesteps)
        prompt_len = len(pipe.tokenizer(prompt if isinstance(prompt, str) else prompt[0]).input_ids)
        blocks = (prompt_len + gen_length + block_length - 1) // block_length - prompt_len // block_length
        scheduler.set_total_steps(min(steps, gen_length) * blocks)
    generator = torch.Generator().manual_seed(seed)
    with NFECounter(pipe.model) as counter:
        out = pipe(prompt=prompt, gen_length=gen_length, block_length=block_length, num_inference_steps=steps,
                   temperature=temperature, threshold=threshold, editing_threshold=None, use_chat_template=False,
                   generator=generator)
    fired = getattr(scheduler, "fired_at", None)
    return {"texts": out.texts, "nfe": counter.count, "step_budget": pipe.num_timesteps,
            "fired_at_step": list(fired) if fired is not None else None}


def generate_text(prompt: str, *, model: str | Path | None = None, prophet: bool = True,
                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS, steps: int = 8, gen_length: int = 24,
                  block_length: int = 8, temperature: float = 0.0, answer_start: int | None = None,
                  progress_mode: str = "block", seed: int = 0) -> dict:
    """Check the options, load the model, generate once: the record ``fastgen generate-text`` prints.

    Keys: ``prompt``, ``text``, ``prophet``, ``thresholds`` (None without Prophet), ``nfe`` (= ``steps_used``),
    ``step_budget``, ``fired_at_step`` (1-based global step of Prophet's commit, or None).
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}.")
    thresholds = validate_text_options(thresholds=thresholds, steps=steps, gen_length=gen_length,
                                       block_length=block_length, temperature=temperature,
                                       answer_start=answer_start, progress_mode=progress_mode)
    pipe = load_text_pipeline(model, prophet=prophet, thresholds=thresholds, answer_start=answer_start,
                              progress_mode=progress_mode)
    res = run_text(pipe, prompt, steps=steps, gen_length=gen_length, block_length=block_length, seed=seed,
                   temperature=temperature)
    return {
        "prompt": prompt, "text": res["texts"][0], "prophet": prophet,
        "thresholds": list(thresholds) if prophet else None, "nfe": res["nfe"],
        "steps_used": res["nfe"], "step_budget": res["step_budget"],
        "fired_at_step": res["fired_at_step"][0] if res["fired_at_step"] else None,
    }

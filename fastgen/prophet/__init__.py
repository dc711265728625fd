"""Prophet: early-commit decoding for masked diffusion language models.

Li et al., "Diffusion Language Models Know the Answer Before Decoding", arXiv:2508.19982.

A masked diffusion LM usually "knows" its answer long before the last refinement step. Prophet watches the gap between
the top-1 and top-2 logits; once the gap averaged over the monitored positions clears a threshold that falls as
decoding progresses (7.5 / 5.0 / 2.5 by default), every remaining mask is committed to the current argmax at once.
The decision reuses the logits of the step's forward pass, so it costs no extra forward evaluation (NFE).

Modules:

- :mod:`~fastgen.prophet.criterion`: the early-commit test (:func:`top2_gap`, :func:`mean_gap`,
  :func:`phase_threshold`, :func:`should_commit`) and its argument checks;
- :mod:`~fastgen.prophet.scheduler`: :class:`ProphetScheduler`, a drop-in ``BlockRefinementScheduler`` for diffusers'
  ``LLaDA2Pipeline`` (semi-autoregressive block diffusion);
- :mod:`~fastgen.prophet.generate`: :func:`prophet_generate`, the decode loop for LLaDA-1 / Dream style
  full-sequence masked diffusion LMs;
- :mod:`~fastgen.prophet.nfe`: :class:`NFECounter`, exact forward-pass counting by a hook on the model;
- :mod:`~fastgen.prophet.arith`: the synthetic task of the built-in ``arith-dlm`` model;
- :mod:`~fastgen.prophet.builtin`: :func:`load_builtin_dlm`, the loader of that model;
- :mod:`~fastgen.prophet.text`: one generation with forward counting (``fastgen generate-text``);
- :mod:`~fastgen.prophet.benchmark`: stock scheduler vs Prophet, accuracy against forward passes
  (``fastgen eval prophet``).
"""
from __future__ import annotations

# By name: diffusers' pipeline loader looks the saved library ("fastgen.prophet", see below) up for these base classes.
from diffusers.configuration_utils import ConfigMixin  # noqa: F401
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .arith import (
    ARITH_ANSWER_PREFIX,
    ARITH_WORDS,
    arith_extract_answer,
    arith_is_heldout,
    arith_problem,
    arith_problems,
)
from .benchmark import eval_prophet, plot_prophet_benchmark, run_prophet_benchmark, save_prophet_benchmark
from .builtin import BUILTIN_MODEL, load_builtin_dlm
from .criterion import (
    DEFAULT_PHASE_BOUNDARIES,
    DEFAULT_THRESHOLDS,
    answer_start_from_constraints,
    mean_gap,
    phase_threshold,
    should_commit,
    top2_gap,
    validate_phase_boundaries,
    validate_thresholds,
)
from .generate import ProphetGenerateOutput, in_block_mask, prophet_generate, validate_generation_args
from .nfe import NFECounter
from .scheduler import PROGRESS_MODES, ProphetScheduler
from .text import generate_text, load_text_pipeline, run_text, validate_text_options

# Saved pipelines name the scheduler's module in model_index.json: keep the public path, not the file it lives in,
# so folders saved before and after the split into a package load alike.
ProphetScheduler.__module__ = __name__

__all__ = [
    "ARITH_ANSWER_PREFIX",
    "ARITH_WORDS",
    "BUILTIN_MODEL",
    "DEFAULT_PHASE_BOUNDARIES",
    "DEFAULT_THRESHOLDS",
    "PROGRESS_MODES",
    "NFECounter",
    "ProphetGenerateOutput",
    "ProphetScheduler",
    "answer_start_from_constraints",
    "arith_extract_answer",
    "arith_is_heldout",
    "arith_problem",
    "arith_problems",
    "eval_prophet",
    "generate_text",
    "in_block_mask",
    "load_builtin_dlm",
    "load_text_pipeline",
    "mean_gap",
    "phase_threshold",
    "plot_prophet_benchmark",
    "prophet_generate",
    "run_prophet_benchmark",
    "run_text",
    "save_prophet_benchmark",
    "should_commit",
    "top2_gap",
    "validate_generation_args",
    "validate_phase_boundaries",
    "validate_text_options",
    "validate_thresholds",
]

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

import importlib

# Public names by submodule. They load on first use, so that ``import fastgen.prophet`` (and ``fastgen --help``,
# whose option dataclasses live in ``text`` and ``benchmark``) does not import diffusers.
_EXPORTS = {
    "criterion": ("DEFAULT_PHASE_BOUNDARIES", "DEFAULT_THRESHOLDS", "PROGRESS_MODES", "answer_start_from_constraints",
                  "mean_gap", "phase_threshold", "should_commit", "top2_gap", "validate_phase_boundaries",
                  "validate_thresholds"),
    "scheduler": ("ProphetScheduler",),
    "generate": ("ProphetGenerateOutput", "in_block_mask", "prophet_generate", "validate_generation_args"),
    "nfe": ("NFECounter",),
    "arith": ("ARITH_ANSWER_PREFIX", "ARITH_WORDS", "arith_extract_answer", "arith_is_heldout", "arith_problem",
              "arith_problems"),
    "builtin": ("BUILTIN_MODEL", "load_builtin_dlm"),
    "text": ("GenerateTextConfig", "generate_text", "load_text_pipeline", "run_text", "validate_text_options"),
    "benchmark": ("ProphetBenchmarkConfig", "eval_prophet", "plot_prophet_benchmark", "run_prophet_benchmark"),
}
# By name: diffusers' pipeline loader looks these base classes up in the module a saved pipeline names for its
# scheduler, "fastgen.prophet" (see ``ProphetScheduler.__module__``).
_DIFFUSERS = {"ConfigMixin": "diffusers.configuration_utils", "SchedulerMixin": "diffusers.schedulers.scheduling_utils"}
_MODULE_OF = {name: f"{__name__}.{module}" for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name) or _DIFFUSERS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

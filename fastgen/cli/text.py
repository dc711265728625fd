"""``fastgen generate-text`` and ``fastgen eval prophet``: Prophet early-commit decoding (:mod:`fastgen.prophet`)."""
from __future__ import annotations

import dataclasses

from ..prophet.benchmark import ProphetBenchmarkConfig
from ..prophet.text import GenerateTextConfig
from .command import Command


def run_generate_text(config: GenerateTextConfig) -> dict:
    from ..prophet.text import generate_text

    return generate_text(**dataclasses.asdict(config))


def summarize_generation(record: dict) -> str:
    fired = f", Prophet committed at step {record['fired_at_step']}" if record["fired_at_step"] else ""
    return (f"{record['prompt']}{record['text']}\n"
            f"[{record['nfe']} forward passes of a {record['step_budget']}-step budget{fired}]")


def run_eval_prophet(config: ProphetBenchmarkConfig) -> dict:
    from ..prophet.benchmark import eval_prophet

    return eval_prophet(config, progress=True)


def summarize_benchmark(record: dict) -> str:
    from ..prophet.benchmark import summary_lines

    return "\n".join(summary_lines(record))


COMMANDS = [
    Command("generate-text", GenerateTextConfig, run_generate_text,
            help="generate text with a masked diffusion LM (default: built-in arith-dlm), with Prophet early commit",
            description="Decode with diffusers' LLaDA2Pipeline; --prophet (default) swaps in "
                        "fastgen.prophet.ProphetScheduler (Li et al., arXiv:2508.19982), which commits all remaining "
                        "tokens once the top-2 logit gap clears the thresholds.",
            summary=summarize_generation),
    Command("eval prophet", ProphetBenchmarkConfig, run_eval_prophet,
            help="accuracy vs forward passes: stock scheduler vs Prophet on held-out arith problems",
            description="Runs the stock BlockRefinementScheduler and ProphetScheduler side by side (same problems, "
                        "budgets and seeds) and writes ./prophet.json and ./prophet.png (or --out); an existing file "
                        "is replaced only with --overwrite, or continued with --resume.",
            summary=summarize_benchmark),
]

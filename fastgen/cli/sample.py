"""``fastgen sample``: a labelled image grid from any FastGen pipeline (default: the built-in digits model)."""
from __future__ import annotations

from ..generate import SampleConfig
from .command import Command


def run(config: SampleConfig) -> dict:
    from ..generate import sample_grid

    return sample_grid(config)


def summary(r: dict) -> str:
    return (f"wrote {r['output']}: {r['images']} images, NFE per image {r['nfe']}, {r['sampling_seconds']:.2f}s "
            f"sampling ({r['seconds']:.2f}s total) on {r['device']}, {r['threads']} thread(s)")


COMMANDS = [Command(
    "sample", SampleConfig, run, summary=summary,
    help="generate a labelled image grid (default: the built-in digits model)",
    description="Generate images with fastgen guidance and solvers and write a labelled grid. With no arguments: "
                "4 samples of each digit from the built-in model, 20 steps, CFG 3, samples.png.")]

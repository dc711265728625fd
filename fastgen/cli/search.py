"""``fastgen search-schedule``: S³ search of a per-step solver schedule for a model and NFE."""
from __future__ import annotations

from ..search_schedule import SearchScheduleConfig
from .command import Command


def run(config: SearchScheduleConfig) -> dict:
    from ..search_schedule import search_schedule

    return search_schedule(config)


def summary(r: dict) -> str:
    scores = ", ".join(f"{name} {r[key]:.4g}" for name, key in (("FID", "fid"), ("RMS to reference", "rms_to_reference"))
                       if r.get(key) is not None)
    return (f"best schedule (nfe {r['nfe']}, {r['metric']} {r['search_metric']:.4g}; {scores} on "
            f"{r['rescore_samples']} re-scoring samples) written to {r['out']}")


COMMANDS = [Command(
    "search-schedule", SearchScheduleConfig, run, summary=summary,
    help="search a per-step solver schedule for a model and NFE (S³)",
    description="S³ search (Liu et al. 2024): evolutionary search over USF solver schedules, screened by a learned "
                "predictor and scored by FID of a few hundred samples on fixed seeds (digits features; the paper's "
                "fitness) or by the RMS distance to a high-NFE reference from the same noise (solver accuracy). The top "
                "candidates are re-scored on disjoint seeds: by FID, or by the distance (FID recorded too where it "
                "applies). Resumable: state in OUT.state.json, every evaluation "
                "logged to OUT.log.jsonl.")]

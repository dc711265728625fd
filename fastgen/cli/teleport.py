"""``fastgen teleport-stats``: Gaussian statistics for analytical teleportation."""
from __future__ import annotations

from ..teleport_stats import TeleportStatsConfig
from .command import Command


def run(config: TeleportStatsConfig) -> dict:
    from ..teleport_stats import fit_teleport_stats

    return fit_teleport_stats(config)


COMMANDS = [Command(
    "teleport-stats", TeleportStatsConfig, run, summary=lambda r: f"{r['summary']} written to {r['out']}",
    help="compute Gaussian statistics for analytical teleportation",
    description="Fit N(mu, Sigma) (Wang & Vastola 2024) to the built-in digits data or to model samples, in the "
                "model's input space, and save it (.safetensors or .npz) for `teleport=`.")]

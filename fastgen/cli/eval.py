"""``fastgen eval fid`` and ``fastgen eval ref``: FID/KID/precision-recall of samples or images, reference statistics.

Under ``accelerate launch`` the processes split the work and add their sufficient statistics, so the numbers do
not depend on the process count; only the main process prints.
"""
from __future__ import annotations

from ..evaluation import FidConfig, ReferenceConfig
from .command import Command


def run_fid(config: FidConfig) -> dict:
    from ..evaluation import fid

    return fid(config)


def run_ref(config: ReferenceConfig) -> dict:
    from ..evaluation import reference

    return reference(config)


def _fid_summary(r: dict) -> str:
    rows = [(k, f"{v:.6g}" if k.startswith("kid") else f"{v:.4f}" if isinstance(v, float) else str(v))
            for k, v in r.items() if v is not None]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _ref_summary(r: dict) -> str:
    return f"wrote {r['out']}: n={r['n']}, extractor={r['extractor']}, {r['num_features']} features"


COMMANDS = [
    Command("eval fid", FidConfig, run_fid, summary=_fid_summary,
            help="FID/KID/precision-recall of generated images against real images or reference statistics",
            description="Score fake images (a folder, or samples of a pipeline with any --solver/--guidance/--teleport "
                        "the pipelines accept) against real images (a folder, builtin:digits[:split]) or reference "
                        "statistics (.npz), with fastgen.metrics.evaluate_pipeline. Sample i uses seed + i and "
                        "class i mod num_classes. Same as `python eval/fid.py`."),
    Command("eval ref", ReferenceConfig, run_ref, summary=_ref_summary,
            help="write reference statistics (.npz: float64 mu, sigma + metadata) of a dataset",
            description="Compute FID reference statistics of an image folder or builtin:digits[:split] and write them "
                        "as .npz (keys mu, sigma, readable by pytorch-fid, clean-fid and EDM; plus n, extractor, "
                        "resize_mode and, unless --no-store-features, the raw features for KID and precision/recall)."),
]

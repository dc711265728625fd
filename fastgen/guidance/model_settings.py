"""A model folder's recommended guidance settings: what ``guidance="ag"`` (or another name) means for that model.

The papers' defaults are tuned for their models (APG's norm threshold r = 15 for SDXL latents, AG's γ̄ = 0.991 on
ε for SD): on a small pixel model they do nothing or stop guidance at the first step. A model folder may
therefore carry ``guidance.json``::

    {"format": "fastgen-guidance-settings/1",
     "apg": {"norm_threshold": 1.0},
     "ag": {"space": "x0", "threshold": 0.95},
     "linear-ag": {"space": "x0", "threshold": 0.95},
     "cfg-interval": {"sigma_low": 0.1, "sigma_high": 10.0}}

When a FastGen pipeline resolves a guidance *name* it passes that name's entry as keyword arguments to the
guider's constructor (the pipeline's ``guidance_scale`` is still the scale). Guider objects are used as given,
and a model without the file gets the papers' defaults, so nothing changes for other models. LinearAG's fitted
coefficients live next to it, in ``linear_ag/`` (see :class:`~fastgen.guidance.LinearAG`). The built-in digits
models ship both.
"""
from __future__ import annotations

import json
from pathlib import Path

SETTINGS_FILE = "guidance.json"
SETTINGS_FORMAT = "fastgen-guidance-settings/1"


def load_guidance_settings(model_path) -> dict[str, dict]:
    """The per-guidance keyword arguments recommended in ``<model_path>/guidance.json`` (``{}`` without one).

    A file that exists but is malformed is an error naming it (a silent fallback would change results)."""
    if not model_path:
        return {}
    path = Path(str(model_path)) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"guidance settings {str(path)!r} are not valid JSON ({err}).") from None
    if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT:
        raise ValueError(f"guidance settings {str(path)!r} must be a JSON object with format {SETTINGS_FORMAT!r}.")
    out = {}
    for name, kwargs in data.items():
        if name in ("format", "note") or name.startswith("_"):
            continue
        if not isinstance(kwargs, dict):
            raise ValueError(f"guidance settings {str(path)!r}: entry {name!r} must map argument names to values.")
        out[name] = kwargs
    return out


__all__ = ["SETTINGS_FILE", "SETTINGS_FORMAT", "load_guidance_settings"]

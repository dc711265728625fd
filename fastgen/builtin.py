"""Built-in assets: small models trained by scripts in this repository and shipped inside the package.

``fastgen.load_builtin(name)`` returns a ready pipeline, ``fastgen.builtin_path(name)`` the folder,
``fastgen.builtin.load_pipeline(spec)`` a FastGen pipeline from ``"builtin:<name>"`` or a diffusers folder
(the ``--model`` of every command), ``fastgen.builtin.asset_path(relpath)`` a file shipped in the package.
"""
from __future__ import annotations

import importlib
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# name -> (folder under fastgen/assets, "module:function" that loads the folder into a pipeline/model)
_BUILTINS = {
    "digits": ("digits", "fastgen.pipelines.class_conditional:_load_builtin_digits"),
    "digits-features": ("digits-features", "fastgen.metrics.digits:_load_builtin_features"),
    "arith-dlm": ("arith-dlm", "fastgen.prophet:load_builtin_dlm"),
}


def available_builtins() -> list[str]:
    """Names accepted by :func:`load_builtin` and :func:`builtin_path`."""
    return sorted(_BUILTINS)


def builtin_path(name: str) -> Path:
    """Folder of the built-in asset ``name`` (see :func:`available_builtins`)."""
    if name not in _BUILTINS:
        raise ValueError(f"builtin name must be one of {available_builtins()}, got {name!r}.")
    path = ASSETS_DIR / _BUILTINS[name][0]
    if not path.is_dir():
        raise FileNotFoundError(
            f"built-in asset {name!r} is missing at {path}; reinstall fastgen or rebuild it with the script named in "
            f"the asset's README."
        )
    return path


def load_builtin(name: str, **kwargs):
    """Load the built-in asset ``name``: ``"digits"`` -> ``FastGenClassPipeline``, ``"arith-dlm"`` -> text pipeline."""
    path = builtin_path(name)
    module_name, fn_name = _BUILTINS[name][1].split(":")
    loader = getattr(importlib.import_module(module_name), fn_name)
    return loader(path, **kwargs)


def model_label(path) -> str:
    """How records name a model folder: ``"builtin:<name>"`` for a built-in asset (no machine path), else the path."""
    path = str(path or "")
    for name, (folder, _) in _BUILTINS.items():
        if path and Path(path).resolve() == (ASSETS_DIR / folder).resolve():
            return f"builtin:{name}"
    return path


def asset_path(relative: str) -> Path:
    """A file shipped under ``fastgen/assets`` (e.g. ``"digits-reference/train_stats.npz"``); FileNotFoundError if absent."""
    path = ASSETS_DIR / relative
    if not path.exists():
        raise FileNotFoundError(f"packaged asset {relative!r} is missing at {path}; reinstall fastgen.")
    return path


def load_pipeline(model: str = "builtin:digits", attention: str = "auto", device: str = "cpu"):
    """A FastGen pipeline from ``"builtin:<name>"`` or a diffusers folder, its class chosen by model family.

    Folders whose ``model_index.json`` names a Stable Diffusion XL, Stable Diffusion 1.x/2.x, DiT or
    FastGen class pipeline load as :class:`~fastgen.FastGenStableDiffusionXLPipeline`,
    :class:`~fastgen.FastGenStableDiffusionPipeline` or :class:`~fastgen.FastGenClassPipeline`.
    ``attention`` and ``device`` are checked before anything is loaded.
    """
    from .attention import check_attention_mode
    from .runtime import check_device

    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be 'builtin:<name>' or a diffusers folder path, got {type(model).__name__}.")
    check_attention_mode(attention)
    device = check_device(device)
    model = str(model)
    if model.startswith("builtin:"):
        return load_builtin(model.split(":", 1)[1], attention=attention).to(device)
    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"model must be 'builtin:digits' or a diffusers folder with model_index.json; "
                                f"{model!r} has none.")
    import json

    try:
        name = json.loads((path / "model_index.json").read_text())["_class_name"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"model: {path / 'model_index.json'} is not a valid diffusers model index "
                         f"(JSON with '_class_name'): {err}") from None
    name = name[1] if isinstance(name, list) else str(name)
    from . import FastGenClassPipeline, FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline

    if "XL" in name:
        cls = FastGenStableDiffusionXLPipeline
    elif "StableDiffusion" in name:
        cls = FastGenStableDiffusionPipeline
    elif "DiT" in name or "Class" in name:
        cls = FastGenClassPipeline
    else:
        raise ValueError(f"model pipeline class {name!r} is not supported; fastgen handles class-conditional "
                         f"(DiT, FastGenClassPipeline), Stable Diffusion and SDXL folders.")
    return cls.from_pretrained(path, attention=attention).to(device)

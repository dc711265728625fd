"""Built-in assets: small models trained by scripts in this repository and shipped inside the package.

``fastgen.load_builtin(name)`` returns a ready pipeline, ``fastgen.builtin_path(name)`` the folder.
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

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
    "digits-1step": ("digits-1step", "fastgen.pipelines.student:_load_builtin_student"),
    "digits-msd4": ("digits-msd4", "fastgen.pipelines.msd:_load_builtin_msd"),
    "digits-agd": ("digits-agd", "fastgen.adapters:load_guidance_adapter"),  # pipe.load_guidance_adapter("builtin:digits-agd")
    "digits-small": ("digits-small", "fastgen.pipelines.class_conditional:_load_builtin_digits"),
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
    """Load the built-in asset ``name``: ``"digits"`` -> ``FastGenClassPipeline``, ``"digits-1step"`` ->
    ``FastGenStudentPipeline``, ``"arith-dlm"`` -> text pipeline."""
    path = builtin_path(name)
    if (path / "model_index.json").is_file():
        check_model_folder(path)
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


_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers models, transformers models (text encoders)


def check_model_folder(path) -> dict:
    """Check a diffusers folder's files before loading it; returns its ``model_index.json``.

    Cheap (JSON and safetensors headers only): a missing or invalid ``model_index.json``, a component
    folder without its ``config.json`` or weights, an invalid component config, or a weights file that is
    not a complete safetensors file (truncated, corrupt) is one error naming the file -- FileNotFoundError
    for what is missing, ValueError for what is wrong.
    """
    import json

    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"model must be 'builtin:digits' or a diffusers folder with model_index.json; "
                                f"{str(path)!r} has none.")

    def read_json(file: Path) -> dict:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"model: {file} is not valid JSON ({' '.join(str(err).split())}).") from None
        if not isinstance(data, dict):
            raise ValueError(f"model: {file} must hold a JSON object, got {type(data).__name__}.")
        return data

    index = read_json(index_file)
    if "_class_name" not in index:
        raise ValueError(f"model: {index_file} is not a valid diffusers model index (no '_class_name').")
    for name, spec in index.items():
        # a component is ["library", "ClassName"]; other entries are pipeline options (e.g. a 2-step
        # student's "student_timesteps": [500, 250], which is also a list of two)
        if name.startswith("_") or not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(x, str) for x in spec)):
            continue
        folder = path / name
        if not folder.is_dir():
            raise FileNotFoundError(f"model: component folder {folder} named in {index_file} is missing.")
        config = folder / "config.json"
        if not config.is_file():
            if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
                raise FileNotFoundError(f"model: {config} is missing.")
            continue  # schedulers, tokenizers, feature extractors: diffusers checks their own files
        read_json(config)
        weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        if not weights:
            raise FileNotFoundError(f"model: no weights in {folder} (expected {_WEIGHT_NAMES[0]}.safetensors); "
                                    "the file was removed or never saved.")
        for file in weights:
            if file.suffix == ".safetensors":
                _check_safetensors(file)
    return index


def _check_safetensors(file: Path) -> None:
    """ValueError naming ``file`` unless it is a complete safetensors file (header parses, data all there)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError
        raise ValueError(f"model: {file} is not a complete safetensors file (truncated or corrupt: "
                         f"{' '.join(str(err).split())}).") from None


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
        builtin_path(model.split(":", 1)[1])  # an unknown name fails before anything loads
        return load_builtin(model.split(":", 1)[1], attention=attention).to(device)
    path = Path(model)
    name = check_model_folder(path)["_class_name"]
    name = name[1] if isinstance(name, list) else str(name)
    from . import FastGenClassPipeline, FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline

    if "MSD" in name:  # routed students (fastgen distill --method msd)
        from .pipelines.msd import FastGenMSDPipeline as cls
    elif "Student" in name:  # a distilled student (fastgen distill's export)
        from .pipelines.student import FastGenStudentPipeline as cls
    elif "XL" in name:
        cls = FastGenStableDiffusionXLPipeline
    elif "StableDiffusion" in name:
        cls = FastGenStableDiffusionPipeline
    elif "DiT" in name or "Class" in name:
        cls = FastGenClassPipeline
    else:
        raise ValueError(f"model pipeline class {name!r} is not supported; fastgen handles class-conditional "
                         f"(DiT, FastGenClassPipeline), Stable Diffusion and SDXL folders.")
    try:
        pipe = cls.from_pretrained(path, attention=attention)
    except OSError as err:  # what the checks above cannot see (e.g. a missing tokenizer file): still one line
        raise OSError(f"model: cannot load {path}: {' '.join(str(err).split())}") from None
    return pipe.to(device)

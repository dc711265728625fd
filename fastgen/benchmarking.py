"""The small harness every benchmark shares: options from a dataclass, cells -> JSON (atomic, resumable) + PNG.

A benchmark is a dataclass of options (parsed by ``transformers.HfArgumentParser``, so the same class
serves the command line, recipe files and tests), a list of cells, a function ``cell -> record`` (which
calls :func:`fastgen.metrics.evaluate_pipeline`) and, optionally, a plot of the records::

    opts = parse_options(MyOptions)
    results = Results(opts.out, config=asdict(opts), resume_on=("n", "steps"), fresh=opts.fresh)
    results.run(cells, key=lambda c: {"method": c[0], "scale": c[1]}, measure=measure, plot=plot)

Records are appended to ``results.cells`` and the JSON is rewritten atomically after every cell; a rerun
skips cells whose key is already there (unless ``fresh`` or the options in ``resume_on`` changed).
matplotlib is imported only when a plot is drawn (:func:`pyplot`), with a clear error when it is missing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

__all__ = ["parse_options", "portable", "write_json", "Results", "pyplot", "builtin_pipeline", "diffusers_class_loop"]

T = TypeVar("T")


def parse_options(options: type[T], argv: Sequence[str] | None = None) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into the dataclass ``options`` with ``HfArgumentParser``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(options, description=(options.__doc__ or "").strip().split("\n")[0])
    for action in parser._actions:  # argparse %-formats help texts: a literal "seed % 10" must not crash --help
        if action.help and "%" in action.help and "%(" not in action.help:
            action.help = action.help.replace("%", "%%")
    return parser.parse_args_into_dataclasses(args=None if argv is None else list(argv))[0]


def portable(path: str | os.PathLike) -> str:
    """A path as results should record it: relative to the working directory when inside it, else its name
    (no machine paths in committed results)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a plain open keeps the umask's file mode
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def strip_machine_paths(folder: str | os.PathLike) -> None:
    """Drop ``_name_or_path`` from ``model_index.json`` and every component ``config.json`` of ``folder``: a
    package asset names no folder of the machine it was built on."""
    folder = Path(folder)
    for config_file in [folder / "model_index.json", *folder.glob("*/config.json")]:
        if not config_file.is_file():
            continue
        component = json.loads(config_file.read_text())
        if component.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(component, indent=2, sort_keys=True) + "\n")


def replace_folder(staged: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Put the finished folder ``staged`` in place of ``out`` (same file system): the old folder is moved aside
    first and removed only after the new one is in place, so ``out`` is never half written."""
    import shutil

    out = Path(out)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


CARD_KEYS = ("fid", "accuracy", "roughness", "precision", "recall")


def card_figures(record: dict, rows: Sequence[tuple[str, float, Mapping[str, float]]]) -> str:
    """The "Figures" section of a built-in model's card: one table row ``(name, NFE per image, figures)`` per
    model, figures keyed by :data:`CARD_KEYS`, on the seeds and hardware ``record`` names."""
    lines = [f"| {name} | {nfe:g} | {cell['fid']:.2f} | {100 * cell['accuracy']:.2f}% | {cell['roughness']:.3f} | "
             f"{cell['precision']:.3f} | {cell['recall']:.3f} |" for name, nfe, cell in rows]
    return f"""## Figures

{record['num_samples']:,} samples, sample i from seed i with digit i % 10, the same seeds for every row;
digits FID against the 1,000-image training split; roughness = mean absolute difference of neighbouring
pixels (real digits: about 0.093). Hardware: {record['hardware']}.

| model | NFE / image | FID | accuracy | roughness | precision | recall |
|---|---|---|---|---|---|---|
""" + "\n".join(lines)


def teacher_cells(record_path: str | os.PathLike, num_samples: int) -> list[dict]:
    """The teacher's cells of a distillation record (``benchmarks/results/distill.json``) when it was measured
    on ``num_samples`` samples (the same seeds as the card's model), else none."""
    path = Path(record_path)
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    return record["teacher"] if record["config"]["n"] == num_samples else []


def publish_asset(staged: str | os.PathLike, out: str | os.PathLike, card: str, record: dict) -> Path:
    """Finish a built-in model folder ``staged`` and put it in place of ``out``: machine paths stripped, the
    card as ``README.md``, ``record`` as ``eval.json``, a sample grid; ``out`` is never half written."""
    from .generate import sample_grid

    staged = Path(staged)
    strip_machine_paths(staged)
    (staged / "README.md").write_text(card)
    (staged / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    sample_grid(model=str(staged), count=4, output=str(staged / "samples_grid.png"), progress=False)
    return replace_folder(staged, out)


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend, or an ImportError that says what to install."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'fastgen[plot]' (or pip install matplotlib); the "
                          "numbers are in the JSON file already.") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_colour(plt, i: int, count: int):
    """Colour of curve ``i`` of ``count`` in one plot: distinct hues up to 18 curves (tab10, black, Dark2), then
    tab20's paired shades (two similar shades per hue) so that every curve still has its own colour."""
    if count > 18:
        return plt.cm.tab20(i % 20)
    return plt.cm.tab10(i) if i < 10 else "black" if i == 10 else plt.cm.Dark2(i - 11)


class Results:
    """A benchmark's JSON file: ``{"config": ..., "cells": [...], **extra}``, resumable.

    Args:
        path: the JSON path (its ``.png`` sibling gets the plot).
        config: what the run was configured with (stored under ``"config"``).
        resume_on: config keys that must match the file's for its cells to be kept.
        fresh: ignore an existing file.
    """

    def __init__(self, path: str | os.PathLike, config: dict, *, resume_on: Iterable[str] = (), fresh: bool = False):
        self.path = Path(path)
        self.data: dict = {"config": config, "cells": []}
        if self.path.is_file() and not fresh:
            old = json.loads(self.path.read_text())
            old_config = old.get("config", {})
            if all(old_config.get(k) == config.get(k) for k in resume_on):
                self.data = {**old, "config": {**old_config, **config}}
                self.data.setdefault("cells", [])

    @property
    def cells(self) -> list[dict]:
        return self.data["cells"]

    def find(self, **key) -> dict | None:
        """The last cell whose fields equal ``key``."""
        matches = [c for c in self.cells if all(c.get(k) == v for k, v in key.items())]
        return matches[-1] if matches else None

    def add(self, record: dict) -> None:
        self.cells.append(record)
        self.save()

    def save(self) -> Path:
        return write_json(self.path, self.data)

    def plot(self, draw: Callable[[dict, Path], None]) -> None:
        """``draw(data, png_path)``; a failing plot is reported and never loses the numbers."""
        try:
            draw(self.data, self.path.with_suffix(".png"))
        except Exception as err:  # noqa: BLE001 - the JSON is already written
            print(f"plot failed ({type(err).__name__}: {err}); the numbers are in {self.path}", flush=True)

    def run(self, cells: Iterable, *, key: Callable[[Any], dict], measure: Callable[[Any], dict | None],
            plot: Callable[[dict, Path], None] | None = None, after: Callable[[dict], None] | None = None) -> None:
        """Measure every cell not yet in the file: ``record = {**key(cell), **measure(cell)}`` (``None`` skips it),
        saved after each; ``after(data)`` updates derived fields (summaries) and ``plot`` redraws."""
        for cell in cells:
            k = key(cell)
            if self.find(**k) is not None:
                continue
            record = measure(cell)
            if record is None:
                continue
            self.cells.append({**k, **record})
            if after is not None:
                after(self.data)
            self.save()
            print(json.dumps({**k, **record}), flush=True)
            if plot is not None:
                self.plot(plot)


def builtin_pipeline(name: str = "digits", threads: int = 1):
    """A pipeline for benchmarking: ``threads`` torch CPU threads, no progress bars. ``name``: a built-in asset
    (``"digits"``) or what :func:`fastgen.builtin.load_pipeline` takes (``"builtin:NAME"``, a pipeline folder,
    e.g. a distilled student's)."""
    import torch

    from .builtin import load_builtin, load_pipeline

    torch.set_num_threads(threads)
    folder = "/" in name or os.sep in name or Path(name).is_dir()  # a mistyped folder: load_pipeline names it
    pipe = load_pipeline(name) if name.startswith("builtin:") or folder else load_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_class_loop(unet, scheduler, labels, seeds: Sequence[int], num_inference_steps: int,
                         guidance_scale: float, null_label: int):
    """Class-conditional samples in [-1, 1] from a plain diffusers loop: the baseline FastGen is compared with.

    Only stock parts: one ``torch.Generator(seed)`` per image for the initial noise, ``scheduler.set_timesteps``,
    ``scale_model_input``, CFG in epsilon space (``eps_u + w (eps_c - eps_u)``, conditional and unconditional
    halves in one batch; ``w = 1`` runs the conditional model alone) and ``scheduler.step``.
    """
    import torch

    labels = torch.as_tensor(labels, dtype=torch.long)
    size = unet.config.sample_size
    with torch.no_grad():
        x = torch.cat([torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(s))
                       for s in seeds])
        scheduler.set_timesteps(num_inference_steps)
        x = x * scheduler.init_noise_sigma
        null = torch.full_like(labels, null_label)
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t)
            if guidance_scale == 1.0:
                eps = unet(inp, t, class_labels=labels).sample
            else:
                eps_c, eps_u = unet(torch.cat([inp, inp]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)

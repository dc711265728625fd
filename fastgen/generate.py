"""Sample a labelled image grid with any FastGen pipeline (``fastgen sample``; also usable from Python).

:class:`SampleConfig` holds the options and their defaults (the CLI parses them from it);
:func:`sample_grid` validates them, loads the model, samples and writes the grid.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_CLASS_SCALE = 3.0  # CFG scale of class-conditional models when none is given
DEFAULT_TEXT_SCALE = 7.5  # the SD pipelines' own default
DEFAULT_STEPS = 20  # solver steps when none are given (a distilled student runs its own step list)


@dataclass
class SampleConfig:
    """Options of :func:`sample_grid` (and of ``fastgen sample``)."""

    model: str = field(default="builtin:digits", metadata={
        "help": "'builtin:digits', 'builtin:digits-1step' (a distilled one-step student) or a diffusers folder "
                "(class-conditional, distilled student, SD 1.x/2.x or SDXL)"})
    classes: Optional[list[int]] = field(default=None, metadata={
        "help": "class ids for class-conditional models (default: every class)"})
    prompt: Optional[list[str]] = field(default=None, metadata={"help": "prompt(s) for text-to-image models"})
    negative_prompt: Optional[str] = field(default=None, metadata={"help": "negative prompt for text-to-image models"})
    count: int = field(default=4, metadata={"help": "images per class or per prompt (one grid row each)"})
    steps: Optional[int] = field(default=None, metadata={
        "help": f"solver steps (num_inference_steps; default {DEFAULT_STEPS}); a distilled student runs its own "
                "step list and accepts only that number"})
    guidance: Optional[str] = field(default=None, metadata={
        "help": "guidance method: cfg (default), apg, ag, linear-ag, or 'none' for the conditional model alone; "
                "a distilled student runs without guidance"})
    guidance_scale: Optional[float] = field(default=None, metadata={
        "help": f"guidance scale, diffusers' meaning (default: {DEFAULT_CLASS_SCALE:g} for class models, "
                f"{DEFAULT_TEXT_SCALE:g} for text-to-image models)", "aliases": ["--scale"]})
    solver: Optional[str] = field(default=None, metadata={
        "help": "the pipeline's scheduler if unset; else a diffusers solver name (dpmsolver++, unipc, ...), a USF "
                "preset (usf-default, ...) or a schedule JSON path (e.g. fastgen/assets/digits-schedules/nfe5.json)"})
    seed: int = field(default=0, metadata={"help": "seed of the first image; image i uses seed + i"})
    teleport: Optional[str] = field(default=None, metadata={
        "help": "Gaussian statistics (.safetensors/.npz from `fastgen teleport-stats`) for analytical teleportation"})
    teleport_fraction: Optional[float] = field(default=None, metadata={
        "help": "share of steps replaced by the teleport (needs --teleport; default: the pipeline's)"})
    guidance_adapter: Optional[str] = field(default=None, metadata={
        "help": "AGD guidance adapter loaded onto the model (builtin:digits-agd or a folder): CFG at "
                "--guidance-scale for one network evaluation per step"})
    batch_size: int = field(default=64, metadata={"help": "images per forward batch"})
    attention: str = field(default="auto", metadata={"help": "attention backend: auto, sdpa or xformers"})
    device: str = field(default="cpu", metadata={"help": "torch device (cpu, cuda, cuda:1, mps)"})
    output: str = field(default="samples.png", metadata={"help": "where to write the grid (PNG)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output file"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr"})


def check_output_path(path, suffixes: tuple[str, ...], name: str = "output") -> Path:
    """``path`` as a Path if it has one of ``suffixes`` and its folder can be created; else ValueError."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{name} must be a {' or '.join(suffixes)} path, got {str(path)!r}.")
    if path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a folder; give a file path ending in {suffixes[0]}.")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name} {str(path)!r} cannot be written: {str(parent)!r} is a file, not a folder.")
            if not os.access(parent, os.W_OK):
                raise ValueError(f"{name} {str(path)!r} cannot be written: no write permission in {str(parent)!r}.")
            break
    return path


def save_image_atomic(image, path: Path) -> None:
    """Write a PIL image through a temporary file and ``os.replace`` (no half-written file on Ctrl-C)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{path.suffix}")  # not mkstemp: keep the umask's file mode
    try:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_sampling_options(*, steps=None, guidance=None, guidance_scale=None, teleport=None,
                           teleport_fraction=None, scale_name: str = "guidance_scale") -> None:
    """The sampling options a command passes to a pipeline, checked before any model loads (``None``: unset;
    ``scale_name``: the command's name for the guidance scale, used in its error)."""
    from .guidance import check_guidance_scale, resolve_guidance
    from .pipelines.common import check_positive_int

    if steps is not None:
        check_positive_int("steps", steps)
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale, scale_name)
    if guidance not in (None, "none"):  # the library's one message naming the accepted values
        resolve_guidance(guidance, 2.0 if guidance_scale is None else guidance_scale)
    if teleport_fraction is not None and teleport is None:
        raise ValueError("teleport_fraction needs teleport (statistics from `fastgen teleport-stats`).")


def check_student_options(pipe, *, steps=None, guidance=None, guidance_scale=None, solver=None, teleport=None,
                          teleport_fraction=None) -> None:
    """A distilled student runs its own step list without guidance: refuse options that would change that."""
    if steps is not None and steps != pipe.nfe:
        raise ValueError(f"steps: this distilled student runs {pipe.nfe} step(s) (timesteps "
                         f"{pipe.student_timesteps}); omit steps or pass {pipe.nfe}.")
    if guidance not in (None, "none") or guidance_scale not in (None, 1.0):
        raise ValueError("guidance: a distilled student runs without guidance (its teacher's guidance is distilled "
                         "in); omit guidance and guidance_scale, or pass guidance none.")
    for name, value in (("solver", solver), ("teleport", teleport), ("teleport_fraction", teleport_fraction)):
        if value is not None:
            raise ValueError(f"{name}: a distilled student has no solver or teleport to change; omit {name}.")


def is_student(pipe) -> bool:
    """``pipe`` is a distilled student (:class:`~fastgen.pipelines.student.FastGenStudentPipeline`)."""
    from .pipelines.student import FastGenStudentPipeline

    return isinstance(pipe, FastGenStudentPipeline)


@dataclass
class SamplingPlan:
    """How a command calls a loaded pipeline: the resolved options (for records and titles) and the kwargs."""

    steps: int
    guidance: str  # a guidance name or "none"
    scale: float
    solver: str
    call: dict
    student: bool


def plan_sampling(pipe, *, steps=None, guidance=None, guidance_scale=None, solver=None, teleport=None,
                  teleport_fraction=None, default_scale: float = DEFAULT_CLASS_SCALE) -> SamplingPlan:
    """Resolve a command's sampling options (``None``: the default) for ``pipe``: a distilled student runs its
    own step list without guidance (options that would change that are refused by name); any other pipeline
    gets ``steps`` (default :data:`DEFAULT_STEPS`), ``guidance`` (default CFG) at ``guidance_scale``
    (default ``default_scale``), ``solver`` and ``teleport``."""
    if is_student(pipe):
        check_student_options(pipe, steps=steps, guidance=guidance, guidance_scale=guidance_scale, solver=solver,
                              teleport=teleport, teleport_fraction=teleport_fraction)
        return SamplingPlan(pipe.nfe, "none", 1.0, f"student {pipe.steps_label}", {}, True)
    name = guidance or "cfg"
    scale = 1.0 if name == "none" else (default_scale if guidance_scale is None else guidance_scale)
    steps = steps or DEFAULT_STEPS
    call = dict(num_inference_steps=steps, guidance=None if name == "none" else name, guidance_scale=scale,
                solver=solver)
    if teleport is not None:
        call["teleport"] = teleport
        if teleport_fraction is not None:
            call["teleport_fraction"] = teleport_fraction
    return SamplingPlan(steps, name, scale, solver or type(pipe.scheduler).__name__, call, False)


def _check(config: SampleConfig) -> Path:
    """Everything checkable before the model loads."""
    from .pipelines.common import check_positive_int

    for name in ("count", "batch_size"):
        check_positive_int(name, getattr(config, name))
    check_sampling_options(steps=config.steps, guidance=config.guidance, guidance_scale=config.guidance_scale,
                           teleport=config.teleport, teleport_fraction=config.teleport_fraction)
    if config.guidance_adapter is not None:
        from .adapters import resolve_adapter_folder

        resolve_adapter_folder(config.guidance_adapter, name="guidance_adapter")
    output = check_output_path(config.output, (".png",))
    if output.exists() and not config.overwrite:
        raise FileExistsError(f"output {str(output)!r} already exists; set overwrite (--overwrite) to replace it, "
                              "or choose another output path.")
    return output


def sample_grid(config: SampleConfig | None = None, **overrides) -> dict:
    """Sample ``config.count`` images per class (or prompt), write a labelled grid to ``config.output``.

    One column per class or prompt, one row per repeat; image ``i`` uses seed ``config.seed + i``, so
    the grid does not depend on ``batch_size``. Returns a JSON-serialisable record (output path, images,
    NFE per image, seconds, ...).
    """
    config = SampleConfig(**overrides) if config is None else config
    output = _check(config)
    from .teleport import resolve_teleport

    teleport = resolve_teleport(config.teleport)  # a bad file fails here, before the model loads
    import torch

    from . import FastGenClassPipeline
    from .builtin import load_pipeline
    from .grid import image_grid

    t0 = time.perf_counter()
    pipe = load_pipeline(config.model, attention=config.attention, device=config.device)
    is_class = isinstance(pipe, FastGenClassPipeline)
    if is_class:
        if config.prompt:
            raise ValueError("prompt is for text-to-image models; this model is class-conditional, use classes.")
        keys = config.classes if config.classes is not None else list(range(pipe.num_classes))
    else:
        if not config.prompt:
            raise ValueError("prompt is required for text-to-image models.")
        if config.classes is not None:
            raise ValueError("classes is for class-conditional models; this is a text-to-image model, use prompt.")
        keys = list(config.prompt)
    plan = plan_sampling(pipe, steps=config.steps, guidance=config.guidance, guidance_scale=config.guidance_scale,
                         solver=config.solver, teleport=teleport, teleport_fraction=config.teleport_fraction,
                         default_scale=DEFAULT_CLASS_SCALE if is_class else DEFAULT_TEXT_SCALE)
    if config.guidance_adapter is not None:
        if plan.student:
            raise ValueError("guidance_adapter: a distilled student runs without guidance; omit guidance_adapter.")
        pipe.load_guidance_adapter(config.guidance_adapter)
    conds = [k for _ in range(config.count) for k in keys]  # one row per repeat, one column per class/prompt
    images, nfe = [], None
    one_batch = len(conds) <= config.batch_size
    pipe.set_progress_bar_config(disable=not (config.progress and one_batch), desc="sampling", leave=False)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(conds), desc="sampling", unit="img", file=sys.stderr, leave=False,
               disable=one_batch or not config.progress)
    t1 = time.perf_counter()
    for start in range(0, len(conds), config.batch_size):
        chunk = conds[start:start + config.batch_size]
        seeds = [config.seed + start + i for i in range(len(chunk))]
        with torch.no_grad():
            if is_class:
                out = pipe(class_labels=chunk, seed=seeds, **plan.call)
            else:
                negative = [config.negative_prompt] * len(chunk) if config.negative_prompt else None
                out = pipe(prompt=chunk, negative_prompt=negative, seed=seeds, **plan.call)
        images.extend(out.images)
        nfe = out.nfe
        bar.update(len(chunk))
    bar.close()
    sample_seconds = time.perf_counter() - t1

    name = config.model.split(":")[-1] if config.model.startswith("builtin:") else Path(config.model).name
    captions = [pipe.label_name(c) for c in conds] if is_class else None
    if plan.student:
        title = f"{name} | distilled student, {pipe.steps_label} | no guidance | NFE {nfe}/img"
    else:
        title = (f"{name} | {Path(plan.solver).name} | {plan.steps} steps | {plan.guidance} {plan.scale:g} | "
                 f"NFE {nfe}/img" + (" | teleport" if teleport is not None else "")
                 + (" | AGD adapter" if config.guidance_adapter is not None else ""))
    ncols = len(keys) if len(keys) > 1 else min(len(conds), 8)
    grid = image_grid(images, ncols=ncols, captions=captions, title=title,
                      cell_size=64 if is_class else max(64, images[0].size[0]))
    save_image_atomic(grid, output)
    return {"output": str(output), "images": len(images), "nfe": nfe, "steps": plan.steps,
            "guidance": plan.guidance, "guidance_scale": plan.scale, "solver": plan.solver,
            "teleport": config.teleport, "guidance_adapter": config.guidance_adapter, "seconds": round(time.perf_counter() - t0, 3),
            "sampling_seconds": round(sample_seconds, 3), "device": config.device,
            "threads": torch.get_num_threads()}


__all__ = ["SampleConfig", "sample_grid", "check_output_path", "save_image_atomic", "check_sampling_options",
           "check_student_options", "is_student", "plan_sampling", "SamplingPlan"]

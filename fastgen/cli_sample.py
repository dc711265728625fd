"""``fastgen sample``: generate an image grid with any FastGen pipeline (default: the built-in digits model)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate a labelled image grid (default: the built-in digits model)",
        description="Generate images with fastgen guidance and solvers and write a labelled grid. With no "
                    "arguments: 4 samples of each digit from the built-in model, 20 steps, CFG, samples.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="builtin:digits",
                   help="'builtin:digits' or a diffusers folder (class-conditional, SD 1.x/2.x or SDXL)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="class ids for class-conditional models (default: every class)")
    p.add_argument("--prompt", nargs="+", default=None, help="prompt(s) for text-to-image models")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for text-to-image models")
    p.add_argument("--count", type=int, default=4, help="images per class or per prompt")
    p.add_argument("--steps", type=int, default=20, help="solver steps")
    p.add_argument("--guidance", default="cfg", help="guidance method ('none' for conditional only)")
    p.add_argument("--scale", type=float, default=None,
                   help="guidance scale (default: 3.0 for class models, the pipeline's own default otherwise)")
    p.add_argument("--solver", default=None, help="solver name (default: the pipeline's scheduler)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--teleport", default=None, help="Gaussian statistics (.safetensors/.npz, `fastgen teleport-stats`) for analytical teleportation")
    p.add_argument("--teleport-fraction", type=float, default=0.2, help="share of steps replaced by the teleport (with --teleport)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"], help="attention backend")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--output", default="samples.png", help="where to write the grid (PNG)")
    p.add_argument("--json", action="store_true", help="print a JSON record (nfe, seconds, output path)")
    p.set_defaults(func=run)


def _check(args) -> None:
    for name in ("count", "steps", "batch_size"):
        value = getattr(args, name)
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    from .guidance import available_guidance
    if args.guidance != "none" and args.guidance not in available_guidance():
        raise ValueError(f"--guidance must be one of {['none', *available_guidance()]}, got {args.guidance!r}.")
    if args.solver is not None:
        from .solvers import available_solvers
        from .solvers.usf import available_presets
        names = available_solvers() + available_presets()
        if args.solver not in names and not (args.solver.endswith(".json") and Path(args.solver).is_file()):
            raise ValueError(f"--solver must be one of {names} or a schedule .json file, got {args.solver!r}.")
    if args.teleport is not None and not Path(args.teleport).is_file():
        raise FileNotFoundError(f"--teleport must be a statistics file written by `fastgen teleport-stats`; "
                                f"{args.teleport!r} does not exist.")
    if not 0.0 <= args.teleport_fraction < 1.0:
        raise ValueError(f"--teleport-fraction must be in [0, 1), got {args.teleport_fraction}.")
    if not args.output.lower().endswith(".png"):
        raise ValueError(f"--output must be a .png path, got {args.output!r}.")


def load_pipeline(model: str, attention: str = "auto", device: str = "cpu"):
    """Load a FastGen pipeline from ``builtin:<name>`` or a diffusers folder, choosing the class by family."""
    from .builtin import load_builtin
    if model.startswith("builtin:"):
        pipe = load_builtin(model.split(":", 1)[1], attention=attention)
    else:
        path = Path(model)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"--model must be 'builtin:digits' or a diffusers folder with model_index.json; "
                                    f"{model!r} has none.")
        from diffusers import DiffusionPipeline
        from . import FastGenClassPipeline, FastGenStableDiffusionPipeline, FastGenStableDiffusionXLPipeline
        name = DiffusionPipeline.load_config(path)["_class_name"]
        name = name[1] if isinstance(name, list) else name
        if "XL" in name:
            cls = FastGenStableDiffusionXLPipeline
        elif "StableDiffusion" in name:
            cls = FastGenStableDiffusionPipeline
        elif "DiT" in name or "Class" in name:
            cls = FastGenClassPipeline
        else:
            raise ValueError(f"--model pipeline class {name!r} is not supported; fastgen sample handles class-conditional "
                             f"(DiT, FastGenClassPipeline), Stable Diffusion and SDXL folders.")
        pipe = cls.from_pretrained(path, attention=attention)
    return pipe.to(device)


def run(args) -> int:
    _check(args)
    import torch
    from tqdm.auto import tqdm

    from . import FastGenClassPipeline
    from .grid import image_grid

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, args.attention, args.device)
    pipe.set_progress_bar_config(disable=True)
    guidance = None if args.guidance == "none" else args.guidance
    is_class = isinstance(pipe, FastGenClassPipeline)
    if is_class:
        if args.prompt:
            raise ValueError("--prompt is for text-to-image models; this model is class-conditional, use --classes.")
        classes = args.classes if args.classes is not None else list(range(pipe.num_classes))
        bad = [c for c in classes if not 0 <= c < pipe.num_classes]
        if bad:
            raise ValueError(f"--classes must be in [0, {pipe.num_classes}), got {bad}.")
        conds = [c for _ in range(args.count) for c in classes]  # one row per repeat, one column per class
        scale = 3.0 if args.scale is None else args.scale
    else:
        if not args.prompt:
            raise ValueError("--prompt is required for text-to-image models.")
        conds = [p for _ in range(args.count) for p in args.prompt]
        scale = 7.5 if args.scale is None else args.scale
    if guidance is None:
        scale = 1.0

    from .teleport import resolve_teleport

    teleport = resolve_teleport(args.teleport)
    images, nfe = [], None
    bar = tqdm(total=len(conds), desc="sampling", unit="img", file=sys.stderr, disable=len(conds) <= args.batch_size)
    t1 = time.perf_counter()
    for start in range(0, len(conds), args.batch_size):
        chunk = conds[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(chunk))]
        kw = dict(num_inference_steps=args.steps, guidance=guidance, guidance_scale=scale, solver=args.solver, seed=seeds)
        if teleport is not None:  # analytical teleportation over the first steps (fastgen.teleport)
            kw.update(teleport=teleport, teleport_fraction=args.teleport_fraction)
        with torch.no_grad():
            if is_class:
                out = pipe(class_labels=chunk, **kw)
            else:
                out = pipe(prompt=chunk, negative_prompt=[args.negative_prompt] * len(chunk) if args.negative_prompt else None, **kw)
        images.extend(out.images)
        nfe = out.nfe
        bar.update(len(chunk))
    bar.close()
    sample_seconds = time.perf_counter() - t1

    ncols = len(conds) // args.count if len(set(conds)) > 1 else min(len(conds), 8)
    captions = [pipe.label_name(c) if i < ncols else "" for i, c in enumerate(conds)] if is_class else None
    name = args.model.split(":")[-1] if args.model.startswith("builtin:") else Path(args.model).name
    title = f"{name} | {args.steps} steps | {args.guidance} {scale:g} | NFE {nfe}/img"
    grid = image_grid(images, ncols=ncols, captions=captions, title=title,
                      cell_size=64 if is_class else max(64, images[0].size[0]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.output)
    record = {"output": str(args.output), "images": len(images), "nfe": nfe, "steps": args.steps,
              "guidance": args.guidance, "guidance_scale": scale, "solver": args.solver or "pipeline scheduler",
              "seconds": round(time.perf_counter() - t0, 3), "sampling_seconds": round(sample_seconds, 3),
              "device": args.device}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"wrote {args.output}: {len(images)} images, NFE per image {nfe}, "
              f"{record['sampling_seconds']:.2f}s sampling ({record['seconds']:.2f}s total) on {args.device}")
    return 0

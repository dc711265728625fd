"""``fastgen eval fid`` and ``fastgen eval ref``: FID/KID/precision-recall evaluation and reference statistics.

``fastgen eval ref`` turns a dataset (image folder or ``builtin:digits[:split]``) into reference
statistics (``.npz``); ``fastgen eval fid`` scores a set of fake images (a folder, or samples drawn from
a pipeline with given steps/guidance/solver/seeds) against real images or reference statistics.
``python eval/fid.py ...`` is the same command. Under ``accelerate launch`` the processes split the
work (batches of seeds, round robin) and add their sufficient statistics, so the result does not
depend on the number of processes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DIGITS_SPLITS = ("train", "heldout", "features", "all")
REAL_BATCH_SIZE = 500  # feature batches of real images (fixed, so results do not depend on --batch-size)


# --------------------------------------------------------------------------- argument parsers
def register(subparsers) -> None:
    """No top-level commands: evaluation lives under ``fastgen eval``."""


def register_eval(eval_subparsers) -> None:
    fid = eval_subparsers.add_parser(
        "fid", help="FID/KID/precision-recall of generated images against real images or reference statistics",
        description="Score fake images (a folder, or samples of a pipeline) against real images (a folder, "
                    "builtin:digits[:split]) or reference statistics (.npz). Same as `python eval/fid.py`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fid_arguments(fid)
    fid.set_defaults(func=run_fid)

    ref = eval_subparsers.add_parser(
        "ref", help="write reference statistics (.npz: float64 mu, sigma + metadata) of a dataset",
        description="Compute FID reference statistics of an image folder or builtin:digits[:split] and write "
                    "them as .npz (keys mu, sigma, readable by pytorch-fid, clean-fid and EDM; plus n, extractor, "
                    "resize_mode and, unless --no-store-features, the raw features for KID and precision/recall).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ref.add_argument("--data", required=True, help="image folder or builtin:digits[:train|heldout|features|all]")
    _add_feature_arguments(ref)
    ref.add_argument("--out", required=True, help="output .npz path")
    ref.add_argument("--store-features", action=argparse.BooleanOptionalAction, default=True,
                     help="also store the raw features (float32) for KID and precision/recall")
    ref.add_argument("--batch-size", type=int, default=256, help="images per feature batch")
    ref.add_argument("--device", default=None, help="torch device (default: accelerate's device for this process)")
    ref.add_argument("--json", action="store_true", help="print a JSON record")
    ref.set_defaults(func=run_ref)


def _add_feature_arguments(p) -> None:
    p.add_argument("--features", default="digits", help="feature extractor: digits, inception or clip")
    p.add_argument("--inception-weights", default=None,
                   help="path of weights-inception-2015-12-05-6726825d.pth (inception features; needs fastgen[inception])")
    p.add_argument("--clip-model", default=None, help="CLIP folder or hub id (clip features)")


def add_fid_arguments(p) -> None:
    """Arguments of ``fastgen eval fid`` (shared with ``eval/fid.py``)."""
    p.add_argument("--real", default="builtin:digits",
                   help="real images: folder, reference statistics .npz, or builtin:digits[:split] (default split: train)")
    p.add_argument("--fake", required=True,
                   help="fake images: a folder of images, or a model to sample (builtin:digits or a pipeline folder)")
    _add_feature_arguments(p)
    p.add_argument("--n", type=int, default=1000, help="samples to draw from a model (ignored for image folders)")
    p.add_argument("--steps", type=int, default=20, help="solver steps when sampling")
    p.add_argument("--guidance", default="cfg", help="guidance method when sampling ('none' for conditional only)")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale (ignored with --guidance none)")
    p.add_argument("--solver", default=None, help="solver name (default: the pipeline's scheduler)")
    p.add_argument("--seed", type=int, default=0, help="seed of sample 0; sample i uses seed + i and class i %% classes")
    p.add_argument("--batch-size", type=int, default=250, help="images per sampling/feature batch")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped at the set sizes)")
    p.add_argument("--pr-k", type=int, default=3, help="k of the k-NN manifolds for precision/recall")
    p.add_argument("--knn-metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="compute KID and precision/recall (they need the raw features of both sets)")
    p.add_argument("--grid", default=None, help="write a PNG grid of the first scored fake images here")
    p.add_argument("--grid-count", type=int, default=64, help="images in the grid")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "xformers"], help="attention backend")
    p.add_argument("--device", default=None, help="torch device (default: accelerate's device for this process)")
    p.add_argument("--json", action="store_true", help="print a JSON record instead of the table")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


# --------------------------------------------------------------------------- image sources
def list_image_folder(folder: str | Path, argument: str) -> list[Path]:
    """Sorted image files of ``folder`` (recursive); errors name the argument and the folder."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{argument} folder {str(path)!r} does not exist.")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{argument} folder {str(path)!r} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def check_image_files(files: list[Path], argument: str) -> tuple[int, int, str]:
    """Read every header; return ``(width, height, mode)`` or fail naming the unreadable or odd-sized file."""
    import PIL.Image

    first = None
    modes = set()
    for f in files:
        try:
            with PIL.Image.open(f) as im:
                size, mode = im.size, im.mode
        except Exception as err:
            raise ValueError(f"{argument}: cannot read image file {str(f)!r}: {err}") from err
        if first is None:
            first = (f, size)
        elif size != first[1]:
            raise ValueError(f"{argument}: images must all have the same size; {str(f)!r} is {size[0]}x{size[1]} but "
                             f"{str(first[0])!r} is {first[1][0]}x{first[1][1]}.")
        modes.add(mode)
    grey = modes <= {"L", "1", "I", "I;16", "F", "LA"}
    return first[1][0], first[1][1], "L" if grey else "RGB"


def load_images(files: list[Path], mode: str, argument: str):
    """Images ``[N, C, H, W]`` float32 in [0, 1] (C = 1 for grey folders, 3 otherwise)."""
    import numpy as np
    import PIL.Image
    import torch

    out = []
    for f in files:
        try:
            with PIL.Image.open(f) as im:
                array = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        except Exception as err:
            raise ValueError(f"{argument}: cannot read image file {str(f)!r}: {err}") from err
        out.append(torch.from_numpy(array).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1))
    return torch.stack(out)


def parse_builtin_data(spec: str, argument: str) -> str | None:
    """``builtin:digits[:split]`` -> split name; ``None`` if ``spec`` is not a builtin dataset."""
    if not spec.startswith("builtin:"):
        return None
    parts = spec.split(":")
    if parts[1] != "digits" or len(parts) > 3:
        raise ValueError(f"{argument} builtin dataset must be builtin:digits[:{'|'.join(DIGITS_SPLITS)}], got {spec!r}.")
    split = parts[2] if len(parts) == 3 else "train"
    if split not in DIGITS_SPLITS:
        raise ValueError(f"{argument} split must be one of {list(DIGITS_SPLITS)}, got {split!r}.")
    return split


def builtin_digits(split: str):
    """Built-in digits split as ``(images in [0, 1], labels)``."""
    from .datasets import load_digits_images

    images, labels = load_digits_images(split, size=16)
    return (images + 1) / 2, labels


# --------------------------------------------------------------------------- evaluation core
@dataclass
class ImageStats:
    """Pixel statistics summed over images (reducible across processes)."""

    n_images: int = 0
    n_pixels: int = 0
    n_values: int = 0
    abs_sum: float = 0.0
    clipped: float = 0.0
    saturation_sum: float = 0.0
    rgb: bool = False
    correct: int = 0
    labelled: int = 0

    def update(self, images, predicted=None, labels=None) -> None:
        from .metrics import quality

        n, pixels = images.shape[0], images.shape[0] * images.shape[2] * images.shape[3]
        self.n_images += n
        self.abs_sum += quality.mean_abs_intensity(images) * images.numel()
        self.clipped += quality.clipped_fraction(images) * images.numel()
        self.saturation_sum += quality.mean_saturation(images) * pixels
        self.rgb = self.rgb or images.shape[1] == 3
        self.n_pixels += pixels
        self.n_values += images.numel()
        if predicted is not None:
            self.correct += int((predicted.cpu() == labels.cpu()).sum())
            self.labelled += n

    def reduce(self, state) -> "ImageStats":
        if state is None or state.num_processes <= 1:
            return self
        import torch
        from accelerate.utils import reduce

        values = torch.tensor([self.n_images, self.n_pixels, self.n_values, self.abs_sum, self.clipped,
                               self.saturation_sum, float(self.rgb), self.correct, self.labelled],
                              dtype=torch.float64, device=state.device)
        v = reduce(values, reduction="sum").cpu().tolist()
        self.n_images, self.n_pixels, self.n_values = int(v[0]), int(v[1]), int(v[2])
        self.abs_sum, self.clipped, self.saturation_sum = v[3:6]
        self.rgb, self.correct, self.labelled = v[6] > 0, int(v[7]), int(v[8])
        return self

    def metrics(self) -> dict:
        if not self.n_values:
            return {}
        out = {"mean_abs": self.abs_sum / self.n_values, "clipped_fraction": self.clipped / self.n_values}
        if self.rgb:
            out["saturation"] = self.saturation_sum / self.n_pixels
        if self.labelled:
            out["class_accuracy"] = self.correct / self.labelled
        return out


@dataclass
class FidResult:
    """What ``fastgen eval fid`` reports."""

    metrics: dict
    record: dict
    grid_images: list = field(default_factory=list)


def _state(device: str | None):
    import torch
    from accelerate import PartialState

    # cpu=True lets torchrun-style launches (LOCAL_RANK/WORLD_SIZE set) run as MULTI_CPU with gloo.
    state = PartialState(cpu=device == "cpu" or (device is None and not torch.cuda.is_available()))
    return state, (device or str(state.device))


def _shard(num_items: int, batch_size: int, state) -> list[tuple[int, int]]:
    """Global batches ``(start, stop)``; process p takes batches p, p + P, ... (independent of the process count)."""
    batches = [(s, min(s + batch_size, num_items)) for s in range(0, num_items, batch_size)]
    if state is None:
        return batches
    return batches[state.process_index::state.num_processes]


def _bar(total: int, desc: str, state, disabled: bool):
    from tqdm.auto import tqdm

    main_process = state is None or state.is_main_process
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=disabled or not main_process)


def accumulate_tensor_images(images, extractor, state=None, batch_size: int = 256, keep_features: bool = True,
                             desc: str = "features", progress: bool = True):
    """Feature statistics of an in-memory image tensor ``[N, C, H, W]`` in [0, 1] (split across processes)."""
    from .metrics.fid import FeatureStats

    stats = FeatureStats(extractor.num_features, keep_features=keep_features)
    batches = _shard(images.shape[0], batch_size, state)
    bar = _bar(images.shape[0], desc, state, not progress)
    for start, stop in batches:
        stats.update(extractor(images[start:stop]), index=range(start, stop))
        bar.update((stop - start) * (state.num_processes if state is not None else 1))
    bar.close()
    return stats.reduce(state)


def accumulate_folder(files, mode, extractor, argument, state=None, batch_size: int = 256, keep_features: bool = True,
                      image_stats: ImageStats | None = None, grid: list | None = None, grid_count: int = 0,
                      progress: bool = True, desc: str = "features"):
    """Feature statistics of image files (split across processes), optionally pixel statistics and grid images."""
    from .metrics.fid import FeatureStats

    stats = FeatureStats(extractor.num_features, keep_features=keep_features)
    bar = _bar(len(files), desc, state, not progress)
    for start, stop in _shard(len(files), batch_size, state):
        images = load_images(files[start:stop], mode, argument)
        stats.update(extractor(images), index=range(start, stop))
        if image_stats is not None:
            image_stats.update(images)
        if grid is not None:
            grid.extend((start + i, images[i]) for i in range(max(0, min(stop, grid_count) - start)))
        bar.update((stop - start) * (state.num_processes if state is not None else 1))
    bar.close()
    return stats.reduce(state)


def sample_pipeline(pipe, extractor, n: int, *, steps: int, guidance: str | None, scale: float, solver: str | None,
                    seed: int, state=None, batch_size: int = 250, keep_features: bool = True,
                    image_stats: ImageStats | None = None, classify: bool = False, grid: list | None = None,
                    grid_count: int = 0, progress: bool = True):
    """Sample ``n`` images with per-seed generators (sample i: seed + i, class i % num_classes) and accumulate
    their features; returns ``(FeatureStats, nfe per image, sampling seconds on this process)``."""
    import torch

    from .metrics.fid import FeatureStats

    num_classes = pipe.num_classes
    stats = FeatureStats(extractor.num_features, keep_features=keep_features)
    bar = _bar(n, "sampling", state, not progress)
    nfe, seconds = None, 0.0
    for start, stop in _shard(n, batch_size, state):
        labels = [i % num_classes for i in range(start, stop)]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(class_labels=labels, num_inference_steps=steps, guidance=guidance, guidance_scale=scale,
                       solver=solver, seed=[seed + i for i in range(start, stop)], output_type="pt")
        seconds += time.perf_counter() - t0
        images, nfe = out.images.float().cpu(), out.nfe
        if not torch.isfinite(images).all():
            raise ValueError(f"the model produced NaN or infinite pixels for seeds {seed + start}..{seed + stop - 1}.")
        stats.update(extractor(images), index=range(start, stop))
        if image_stats is not None:
            predicted = extractor.classify(images) if classify else None
            image_stats.update(images, predicted, torch.tensor(labels) if classify else None)
        if grid is not None:
            grid.extend((start + i, images[i], labels[i]) for i in range(max(0, min(stop, grid_count) - start)))
        bar.update((stop - start) * (state.num_processes if state is not None else 1))
    bar.close()
    return stats.reduce(state), nfe, seconds


def _extractor(args, device):
    from .metrics.features import get_extractor

    return get_extractor(args.features, device=device, inception_weights=args.inception_weights,
                         clip_model=args.clip_model)


def _check_positive(args, names) -> None:
    for name in names:
        value = getattr(args, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")


def _check_features_arg(args) -> None:
    from .metrics.features import EXTRACTORS

    if args.features not in EXTRACTORS and not args.features.startswith("clip:"):
        raise ValueError(f"--features must be one of {list(EXTRACTORS)}, got {args.features!r}.")


def _classify_fake(args) -> tuple[str, object]:
    """``("folder", files)`` or ``("model", spec)`` for --fake, validated without loading anything heavy."""
    spec = args.fake
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name != "digits":
            raise ValueError(f"--fake builtin model must be builtin:digits, got {spec!r}.")
        return "model", spec
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--fake {spec!r} does not exist; give an image folder, a pipeline folder "
                                f"(with model_index.json) or builtin:digits.")
    if (path / "model_index.json").is_file():
        return "model", spec
    return "folder", list_image_folder(path, "--fake")


def _classify_real(args) -> tuple[str, object]:
    spec = args.real
    split = parse_builtin_data(spec, "--real")
    if split is not None:
        return "builtin", split
    path = Path(spec)
    if spec.endswith(".npz"):
        from .metrics.stats import ReferenceStats

        return "stats", ReferenceStats.load(path)
    if path.is_dir():
        return "folder", list_image_folder(path, "--real")
    raise FileNotFoundError(f"--real {spec!r} is not an existing folder or .npz file, nor builtin:digits[:split].")


def evaluate_fid(args, state=None) -> FidResult:
    """The work of ``fastgen eval fid`` (see :func:`add_fid_arguments` for the fields of ``args``)."""
    import torch

    from .metrics.fid import frechet_distance, kernel_inception_distance
    from .metrics.quality import precision_recall

    t_start = time.perf_counter()
    # ---- validate everything before heavy work
    _check_positive(args, ("n", "steps", "batch_size", "kid_subsets", "kid_subset_size", "pr_k", "grid_count"))
    _check_features_arg(args)
    guidance = None if args.guidance == "none" else args.guidance
    scale = 1.0 if guidance is None else float(args.scale)
    if not math.isfinite(scale):
        raise ValueError(f"--scale must be a finite number, got {args.scale}.")
    if guidance is not None:
        from .guidance import available_guidance

        if guidance not in available_guidance():
            raise ValueError(f"--guidance must be one of {['none', *available_guidance()]}, got {args.guidance!r}.")
    if args.solver is not None:
        from .solvers import available_solvers

        if args.solver not in available_solvers():
            raise ValueError(f"--solver must be one of {available_solvers()}, got {args.solver!r}.")
    if args.grid is not None and not str(args.grid).lower().endswith(".png"):
        raise ValueError(f"--grid must be a .png path, got {args.grid!r}.")
    fake_kind, fake = _classify_fake(args)
    real_kind, real = _classify_real(args)
    fake_mode = check_image_files(fake, "--fake")[2] if fake_kind == "folder" else None
    real_mode = check_image_files(real, "--real")[2] if real_kind == "folder" else None

    if state is None:
        state, device = _state(args.device)
    else:
        device = args.device or str(state.device)
    progress = not args.no_progress
    extractor = _extractor(args, device)
    if real_kind == "stats":
        if real.num_features != extractor.num_features:
            raise ValueError(f"--real statistics have {real.num_features} features but --features {args.features} "
                             f"gives {extractor.num_features}; compute the reference with the same extractor.")
        if real.extractor not in ("unknown", extractor.name):
            raise ValueError(f"--real statistics were computed with the {real.extractor!r} extractor, but --features "
                             f"is {extractor.name!r}; FID values across feature spaces are meaningless.")

    keep = bool(args.knn_metrics)
    # ---- real statistics
    if real_kind == "builtin":
        real_stats = accumulate_tensor_images(builtin_digits(real)[0], extractor, state, REAL_BATCH_SIZE, keep,
                                              desc=f"real features ({args.real})", progress=progress)
    elif real_kind == "folder":
        real_stats = accumulate_folder(real, real_mode, extractor, "--real", state, REAL_BATCH_SIZE, keep,
                                       progress=progress, desc="real features")
    else:
        real_stats = None
    mu_r, sigma_r = (real.mu, real.sigma) if real_stats is None else (real_stats.mu, real_stats.sigma)
    n_real = real.n if real_stats is None else real_stats.n
    real_features = None
    if keep:
        if real_stats is not None:
            real_features = real_stats.features
        elif real.features is not None:
            real_features = torch.from_numpy(real.features)

    # ---- fake statistics
    image_stats, grid = ImageStats(), ([] if args.grid else None)
    nfe, sampling_seconds, labelled = None, None, False
    if fake_kind == "model":
        from .cli_sample import load_pipeline

        pipe = load_pipeline(fake, args.attention, device)
        if not hasattr(pipe, "num_classes"):
            raise ValueError(f"--fake model {fake!r} is not class-conditional; fastgen eval fid samples class-conditional "
                             f"pipelines (use an image folder for text-to-image samples).")
        pipe.set_progress_bar_config(disable=True)
        labelled = getattr(extractor, "name", "") == "digits" and pipe.num_classes == extractor.num_classes
        fake_stats, nfe, sampling_seconds = sample_pipeline(
            pipe, extractor, args.n, steps=args.steps, guidance=guidance, scale=scale, solver=args.solver,
            seed=args.seed, state=state, batch_size=args.batch_size, keep_features=keep, image_stats=image_stats,
            classify=labelled, grid=grid, grid_count=args.grid_count, progress=progress)
    else:
        fake_stats = accumulate_folder(fake, fake_mode, extractor, "--fake", state, args.batch_size, keep,
                                       image_stats=image_stats, grid=grid, grid_count=args.grid_count,
                                       progress=progress, desc="fake features")
    image_stats.reduce(state)
    if grid is not None and state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        grid = gather_object(grid)  # (index, image[, label]) from every process

    # ---- metrics
    metrics = {"fid": frechet_distance(mu_r, sigma_r, fake_stats.mu, fake_stats.sigma)}
    if keep and real_features is not None:
        fake_features = fake_stats.features
        kid_mean, kid_std = kernel_inception_distance(real_features, fake_features, subsets=args.kid_subsets,
                                                      subset_size=args.kid_subset_size, seed=0)
        precision, recall = precision_recall(real_features, fake_features, k=args.pr_k)
        metrics.update(kid=kid_mean, kid_std=kid_std, precision=precision, recall=recall)
    metrics.update(image_stats.metrics())
    world = state.num_processes if state is not None else 1
    record = {
        **metrics, "n": fake_stats.n, "n_real": int(n_real), "extractor": extractor.name,
        "resize_mode": extractor.resize_mode, "real": args.real, "fake": args.fake, "nfe": nfe,
        "steps": args.steps if fake_kind == "model" else None,
        "guidance": (args.guidance if fake_kind == "model" else None),
        "guidance_scale": scale if fake_kind == "model" else None,
        "solver": (args.solver or "pipeline scheduler") if fake_kind == "model" else None,
        "seed": args.seed if fake_kind == "model" else None,
        "sampling_seconds": None if sampling_seconds is None else round(sampling_seconds, 3),
        "seconds": round(time.perf_counter() - t_start, 3), "processes": world, "device": device,
    }
    return FidResult(metrics, record, sorted(grid, key=lambda item: item[0]) if grid else [])


def _write_grid(result: FidResult, path: str, title: str) -> None:
    from .grid import image_grid

    items = result.grid_images
    images = [item[1].permute(1, 2, 0).numpy() for item in items]
    captions = [str(item[2]) for item in items] if items and len(items[0]) > 2 else None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, ncols=min(len(images), 10), captions=captions, title=title).save(path)


def format_table(record: dict) -> str:
    """A two-column text table of a result record."""
    rows = []
    for key in ("fid", "kid", "kid_std", "precision", "recall", "class_accuracy", "saturation", "mean_abs",
                "clipped_fraction", "n", "n_real", "extractor", "nfe", "steps", "guidance", "guidance_scale", "solver",
                "sampling_seconds", "seconds", "processes", "device"):
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.6g}" if key.startswith("kid") else f"{value:.4f}"
        rows.append((key, str(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_fid(args) -> int:
    result = evaluate_fid(args)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if args.grid and result.grid_images:
        r = result.record
        title = (f"{args.fake}  steps={r['steps']} {r['guidance']} w={r['guidance_scale']:g}  FID={r['fid']:.2f}"
                 if r["steps"] is not None else f"{args.fake}  FID={r['fid']:.2f}")
        _write_grid(result, args.grid, title)
        result.record["grid"] = str(args.grid)
    if args.json:
        print(json.dumps(result.record))
    else:
        print(format_table(result.record))
    return 0


def compute_reference(args, state=None):
    """The work of ``fastgen eval ref``: ``ReferenceStats`` of ``args.data``."""
    from .metrics.stats import ReferenceStats

    _check_positive(args, ("batch_size",))
    _check_features_arg(args)
    if not str(args.out).endswith(".npz"):
        raise ValueError(f"--out must be a .npz path, got {args.out!r}.")
    split = parse_builtin_data(args.data, "--data")
    files = mode = None
    if split is None:
        files = list_image_folder(args.data, "--data")
        mode = check_image_files(files, "--data")[2]
    if state is None:
        state, device = _state(args.device)
    else:
        device = args.device or str(state.device)
    extractor = _extractor(args, device)
    keep = bool(args.store_features)
    if split is not None:
        stats = accumulate_tensor_images(builtin_digits(split)[0], extractor, state, args.batch_size, keep,
                                         desc=f"features ({args.data})")
        source = f"builtin:digits:{split}"
    else:
        stats = accumulate_folder(files, mode, extractor, "--data", state, args.batch_size, keep)
        source = str(args.data)
    return ReferenceStats.from_feature_stats(stats, extractor.name, extractor.resize_mode, store_features=keep,
                                             source=source)


def run_ref(args) -> int:
    t0 = time.perf_counter()
    ref = compute_reference(args)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    ref.save(args.out)
    record = {"out": str(args.out), "n": ref.n, "extractor": ref.extractor, "resize_mode": ref.resize_mode,
              "num_features": ref.num_features, "features_stored": ref.features is not None,
              "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(record) if args.json else
          f"wrote {args.out}: n={ref.n}, extractor={ref.extractor}, {ref.num_features} features")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``eval/fid.py``: the arguments of ``fastgen eval fid``."""
    parser = argparse.ArgumentParser(prog="fid.py", description="FID evaluation (same as `fastgen eval fid`).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_fid_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_fid(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fid.py: error: {err}", file=sys.stderr)
        return 2

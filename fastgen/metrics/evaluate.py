"""The one evaluator: sample (or load) images -> features -> FID/KID/precision/recall/accuracy/pixel statistics.

:func:`evaluate_pipeline` draws ``num_samples`` images from a FastGen pipeline (sample ``i``: seed
``seed + i``, class ``i % num_classes`` or prompt ``i % len(prompts)``), :func:`evaluate_images` scores
images you already have; both return an :class:`EvalResult`. The CLI (``fastgen eval fid``), the
benchmarks, the S³ search fitness (:mod:`fastgen.solvers.evaluate`) and the training-time FID all call
these two functions.

Metrics: FID (Heusel et al. 2017, arXiv:1706.08500), KID (Bińkowski et al. 2018, arXiv:1801.01401),
improved precision/recall (Kynkäänniemi et al. 2019, arXiv:1904.06991), class accuracy of the digits
classifier, mean HSV saturation (Sadat et al. 2024, arXiv:2410.02416) with its grey-scale analogues,
roughness (mean absolute neighbouring-pixel difference) and, given the reference solution of the same
seeds (:func:`reference_solution`: the same guidance, many solver steps), the RMS distance to it (solver
accuracy).

Under ``accelerate launch`` the processes take batches round robin (batch ``b`` goes to process
``b % P``) and add their sufficient statistics (EDM's ``fid.py`` does the same), and raw features are
ordered by sample index; so the numbers depend neither on the process count nor on the batch size
(beyond float round-off in sums).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .data import builtin_digits, check_image_files, list_image_folder, load_images, parse_builtin_data
from .fid import FeatureStats, frechet_distance, kernel_inception_distance
from .quality import (clipped_fraction, mean_abs_intensity, mean_saturation, precision_recall, roughness_per_image,
                      squared_error_sum)
from .stats import ReferenceStats, builtin_reference_path

__all__ = ["EvalResult", "PixelStats", "evaluate_pipeline", "evaluate_images", "compute_reference", "load_reference",
           "reference_solution", "resolve_state", "REAL_BATCH_SIZE", "REFERENCE_STEPS", "REFERENCE_SOLVER"]

REAL_BATCH_SIZE = 500  # feature batches of real images (fixed, so results do not depend on batch_size)
REFERENCE_SOLVER = "dpmsolver++"  # the reference solution of the (guided) probability-flow ODE: DPM-Solver++(2M)
REFERENCE_STEPS = 500


# --------------------------------------------------------------------------- result
@dataclass
class EvalResult:
    """What an evaluation measured. ``None`` where a metric does not apply (e.g. accuracy without a classifier).

    Attributes:
        fid: Fréchet distance to the reference (float64 sufficient statistics).
        kid, kid_std: KID mean and std over subsets (needs raw features of both sets).
        precision, recall: improved precision/recall with k-NN manifolds (k = ``pr_k``).
        accuracy: share of samples the classifier assigns to the class they were generated for.
        saturation: mean HSV saturation (0 for grey-scale images).
        mean_abs, clipped_fraction: grey-scale saturation analogues (mean ``|x|`` in [-1, 1]; share of pixels
            at the ends of the range).
        roughness: mean absolute difference of neighbouring pixels (images in [0, 1]).
        rms_to_reference: RMS distance (images in [0, 1], over every pixel of every sample) to the reference
            solution passed as ``reference_samples`` (see :func:`reference_solution`); ``None`` without one.
        nfe: network evaluations per sample (CFG step = 2; mean over samples); ``None`` for given images.
        seconds: sampling seconds (pipeline calls), summed over processes; ``seconds_per_image`` per sample.
        wall_seconds: wall time of the whole evaluation on this process.
        num_samples, num_reference: set sizes.
        features: the fake :class:`FeatureStats` (raw features kept when ``knn_metrics``); not in ``to_dict``.
        extra: anything ``on_batch`` callbacks or callers add (kept in ``to_dict``).
    """

    fid: float
    num_samples: int
    num_reference: int
    extractor: str
    kid: float | None = None
    kid_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    accuracy: float | None = None
    saturation: float | None = None
    mean_abs: float | None = None
    clipped_fraction: float | None = None
    roughness: float | None = None
    rms_to_reference: float | None = None
    nfe: float | None = None
    seconds: float | None = None
    seconds_per_image: float | None = None
    wall_seconds: float | None = None
    processes: int = 1
    grid: str | None = None
    extra: dict = field(default_factory=dict)
    features: FeatureStats | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready record (``features`` left out, ``extra`` merged in)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("features", "extra")}
        out.update(self.extra)
        return out


# --------------------------------------------------------------------------- sharding and reduction
def resolve_state(accelerator=None, device: str | torch.device | None = None):
    """``(state, device)``: the given ``Accelerator``/``PartialState``, or a ``PartialState`` for this launch."""
    if accelerator is not None:
        return accelerator, torch.device(device) if device is not None else accelerator.device
    from accelerate import PartialState

    # cpu=True lets torchrun-style launches (LOCAL_RANK/WORLD_SIZE set) run as MULTI_CPU with gloo.
    cpu = str(device) == "cpu" or (device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    return state, torch.device(device) if device is not None else state.device


def _shard(num_items: int, batch_size: int, state) -> list[tuple[int, int]]:
    """Global batches ``(start, stop)``; process p takes batches p, p + P, ... ."""
    batches = [(s, min(s + batch_size, num_items)) for s in range(0, num_items, batch_size)]
    return batches[state.process_index::state.num_processes]


def _reduce_sum(values: list[float], state) -> list[float]:
    """Sum a list of numbers over processes (float64)."""
    if state.num_processes <= 1:
        return list(values)
    from accelerate.utils import reduce

    tensor = torch.tensor(values, dtype=torch.float64, device=state.device)
    return reduce(tensor, reduction="sum").cpu().tolist()


@dataclass
class PixelStats:
    """Pixel statistics summed over images (reducible across processes)."""

    n_images: int = 0
    n_values: int = 0
    n_pixels: int = 0
    abs_sum: float = 0.0
    clipped: float = 0.0
    saturation_sum: float = 0.0
    roughness_sum: float = 0.0
    rgb: bool = False
    correct: int = 0
    labelled: int = 0

    def update(self, images: torch.Tensor, predicted=None, labels=None) -> None:
        """Add images ``[N, C, H, W]`` in [0, 1] (and, for accuracy, predicted and requested labels)."""
        pixels = images.shape[0] * images.shape[2] * images.shape[3]
        self.n_images += images.shape[0]
        self.abs_sum += mean_abs_intensity(images) * images.numel()
        self.clipped += clipped_fraction(images) * images.numel()
        self.saturation_sum += mean_saturation(images) * pixels
        self.roughness_sum += float(roughness_per_image(images).sum())
        self.rgb = self.rgb or images.shape[1] == 3
        self.n_pixels += pixels
        self.n_values += images.numel()
        if predicted is not None:
            self.correct += int((torch.as_tensor(predicted).cpu() == torch.as_tensor(labels).cpu()).sum())
            self.labelled += images.shape[0]

    def reduce(self, state) -> "PixelStats":
        names = [f.name for f in fields(self)]
        values = _reduce_sum([float(getattr(self, n)) for n in names], state)
        for name, value in zip(names, values):
            current = getattr(self, name)
            setattr(self, name, value > 0 if isinstance(current, bool) else type(current)(value))
        return self

    def metrics(self) -> dict:
        if not self.n_values:
            return {}
        return {"mean_abs": self.abs_sum / self.n_values, "clipped_fraction": self.clipped / self.n_values,
                "saturation": self.saturation_sum / self.n_pixels, "roughness": self.roughness_sum / self.n_images,
                "accuracy": self.correct / self.labelled if self.labelled else None}


def _bar(total: int, desc: str, state, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=not enabled or not state.is_main_process)


def _accumulate(fetch: Callable[[int, int], tuple], num_items: int, extractor, state, batch_size: int,
                keep_features: bool, *, pixels: PixelStats | None = None, classifier=None, grid: list | None = None,
                grid_count: int = 0, progress: bool = True, desc: str = "features") -> FeatureStats:
    """The loop every evaluation runs: this process's batches -> ``fetch(start, stop)`` -> ``(images in [0, 1],
    labels or None)`` -> features (+ pixel statistics, classifier accuracy, grid images); reduced over processes."""
    stats = FeatureStats(extractor.num_features, keep_features=keep_features)
    bar = _bar(num_items, desc, state, progress)
    try:
        for start, stop in _shard(num_items, batch_size, state):
            images, labels = fetch(start, stop)
            stats.update(extractor(images), index=range(start, stop))
            if pixels is not None:
                predicted = classifier(images) if classifier is not None and labels is not None else None
                pixels.update(images, predicted, labels)
            if grid is not None:
                grid.extend((start + i, images[i].cpu(), None if labels is None else int(labels[i]))
                            for i in range(max(0, min(stop, grid_count) - start)))
            bar.update((stop - start) * state.num_processes)
    except BaseException:
        bar.leave = False  # an error (or Ctrl-C) gets its own line, not one glued to a half-drawn bar
        raise
    finally:
        bar.close()
    return stats.reduce(state)


# --------------------------------------------------------------------------- references
def _image_source(spec, argument: str):
    """``(num_items, fetch)`` for an image tensor, an image folder or ``builtin:digits:<split>``."""
    if isinstance(spec, torch.Tensor):
        images = spec
        return images.shape[0], lambda a, b: (images[a:b].float(), None)
    split = parse_builtin_data(spec, argument)
    if split is not None:
        images, labels = builtin_digits(split)
        return images.shape[0], lambda a, b: (images[a:b], labels[a:b])
    files = list_image_folder(spec, argument)
    mode = check_image_files(files, argument)[2]
    return len(files), lambda a, b: (load_images(files[a:b], mode, argument), None)


def compute_reference(data, extractor="digits", *, accelerator=None, device=None, batch_size: int = REAL_BATCH_SIZE,
                      store_features: bool = True, progress: bool = True, source: str | None = None) -> ReferenceStats:
    """Reference statistics of ``data`` (image folder, ``builtin:digits[:split]`` or images ``[N, C, H, W]`` in
    [0, 1]) in the feature space of ``extractor`` (what ``fastgen eval ref`` writes)."""
    from .features import get_extractor

    _check_positive("batch_size", batch_size)
    num_items, fetch = _image_source(data, "data")
    state, device = resolve_state(accelerator, device)
    extractor = get_extractor(extractor, device=device)
    stats = _accumulate(fetch, num_items, extractor, state, batch_size, store_features, progress=progress,
                        desc=f"features ({data if isinstance(data, (str, Path)) else 'images'})")
    if source is None:
        split = parse_builtin_data(data, "data") if isinstance(data, str) else None
        source = f"builtin:digits:{split}" if split else (str(data) if isinstance(data, (str, Path)) else "tensor")
    return ReferenceStats.from_feature_stats(stats, extractor.name, extractor.resize_mode,
                                             store_features=store_features, source=source)


def load_reference(reference, extractor, *, state=None, keep_features: bool = True,
                   progress: bool = True) -> ReferenceStats:
    """Resolve ``reference`` to :class:`ReferenceStats` in ``extractor``'s feature space.

    ``reference``: ``"builtin:digits"`` (the shipped train-split statistics, see
    :func:`fastgen.metrics.stats.builtin_reference_path`), ``"builtin:digits:<split>"`` (computed from that
    split's images), a ``.npz`` path, an image folder, a :class:`ReferenceStats` or a :class:`FeatureStats`.
    """
    if isinstance(reference, ReferenceStats):
        ref = reference
    elif isinstance(reference, FeatureStats):
        ref = ReferenceStats.from_feature_stats(reference, extractor.name, extractor.resize_mode,
                                                store_features=reference.keep_features)
    elif isinstance(reference, (str, Path)) and str(reference).startswith("builtin:") and str(reference).count(":") == 1:
        ref = ReferenceStats.load(builtin_reference_path(str(reference).split(":", 1)[1]))
    elif isinstance(reference, (str, Path)) and str(reference).endswith(".npz"):
        ref = ReferenceStats.load(reference)
    elif isinstance(reference, (str, Path)):
        if state is None:
            state, _ = resolve_state()
        num_items, fetch = _image_source(str(reference), "reference")
        stats = _accumulate(fetch, num_items, extractor, state, REAL_BATCH_SIZE, keep_features, progress=progress,
                            desc=f"reference features ({reference})")
        return ReferenceStats.from_feature_stats(stats, extractor.name, extractor.resize_mode,
                                                 store_features=keep_features, source=str(reference))
    else:
        raise TypeError(f"reference must be 'builtin:digits[:split]', a .npz path, an image folder, ReferenceStats "
                        f"or FeatureStats, got {type(reference).__name__}.")
    if ref.num_features != extractor.num_features:
        raise ValueError(f"reference statistics have {ref.num_features} features but the {extractor.name!r} extractor "
                         f"gives {extractor.num_features}; compute the reference with the same extractor.")
    if ref.extractor not in ("unknown", extractor.name):
        raise ValueError(f"reference statistics were computed with the {ref.extractor!r} extractor, but the "
                         f"extractor is {extractor.name!r}; FID values across feature spaces are meaningless.")
    return ref


# --------------------------------------------------------------------------- public entry points
def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _classifier(classifier, extractor, num_classes: int | None):
    """``"auto"``: the digits extractor's classifier when the class count matches; a callable; or ``None``."""
    if classifier is None or classifier is False:
        return None
    if classifier == "auto":
        if getattr(extractor, "name", None) == "digits" and num_classes == getattr(extractor, "num_classes", None):
            return extractor.classify
        return None
    if not callable(classifier):
        raise TypeError(f"classifier must be 'auto', None or a callable images -> labels, got {classifier!r}.")
    return classifier


def _score(fake: FeatureStats, ref: ReferenceStats, pixels: PixelStats, extractor, state, *, knn_metrics: bool,
           kid_subsets: int, kid_subset_size: int, pr_k: int, t_start: float, **rest) -> EvalResult:
    metrics: dict[str, Any] = {"fid": frechet_distance(ref.mu, ref.sigma, fake.mu, fake.sigma)}
    if knn_metrics and ref.features is not None:
        real_features = torch.from_numpy(ref.features)
        metrics["kid"], metrics["kid_std"] = kernel_inception_distance(
            real_features, fake.features, subsets=kid_subsets, subset_size=kid_subset_size, seed=0)
        metrics["precision"], metrics["recall"] = precision_recall(real_features, fake.features, k=pr_k)
    metrics.update(pixels.reduce(state).metrics())
    return EvalResult(**metrics, num_samples=fake.n, num_reference=int(ref.n), extractor=extractor.name,
                      processes=state.num_processes, wall_seconds=time.perf_counter() - t_start, features=fake, **rest)


def _write_grid(items: list, state, path, title: str | None, names: dict | None) -> str | None:
    from ..grid import image_grid

    if state.num_processes > 1:
        from accelerate.utils import gather_object

        items = gather_object(items)
    if not state.is_main_process or not items:
        return str(path)
    items = sorted(items, key=lambda item: item[0])
    images = [item[1].float().permute(1, 2, 0).numpy() for item in items]
    captions = None if items[0][2] is None else [str((names or {}).get(item[2], item[2])) for item in items]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    image_grid(images, ncols=min(len(images), 10), captions=captions, title=title).save(tmp)
    tmp.replace(path)
    return str(path)


def _check_common(batch_size, grid, grid_count, kid_subsets, kid_subset_size, pr_k) -> None:
    for name, value in (("batch_size", batch_size), ("grid_count", grid_count), ("kid_subsets", kid_subsets),
                        ("kid_subset_size", kid_subset_size), ("pr_k", pr_k)):
        _check_positive(name, value)
    if grid is not None and not str(grid).lower().endswith(".png"):
        raise ValueError(f"grid must be a .png path, got {grid!r}.")


def evaluate_pipeline(pipe, num_samples: int = 2000, *, seed: int = 0, labels: Sequence[int] | int | None = None,
                      prompts: Sequence[str] | None = None, extractor="digits", reference="builtin:digits",
                      batch_size: int = 250, classifier="auto", grid: str | Path | None = None, grid_count: int = 64,
                      grid_title: str | None = None, accelerator=None, device=None, progress: bool = True,
                      knn_metrics: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3,
                      on_batch: Callable | None = None, reference_samples: torch.Tensor | None = None,
                      **call_kwargs) -> EvalResult:
    """Sample ``num_samples`` images from ``pipe`` and score them against ``reference``.

    Sample ``i`` uses seed ``seed + i`` and class ``labels[i]`` (default ``i % pipe.num_classes``, balanced)
    or prompt ``prompts[i % len(prompts)]``, so two calls with the same arguments see the same noise and
    conditioning whatever the batch size or process count.

    Args:
        pipe: a FastGen pipeline (class-conditional, or text-to-image with ``prompts``), already on its device.
        num_samples: images to draw.
        seed: seed of sample 0.
        labels: class per sample (a sequence of ``num_samples`` ints, or one int for all); class pipelines only.
        prompts: prompts, cycled over the samples (text pipelines).
        extractor: feature space: ``"digits"``, ``"inception"``, ``"clip:<model>"`` or a feature-extractor module.
        reference: see :func:`load_reference` (default: the shipped digits train-split statistics).
        batch_size: images per pipeline call.
        classifier: ``"auto"`` (the digits classifier when ``extractor`` is digits and the pipeline has its 10
            classes), ``None``, or a callable ``images in [0, 1] -> labels``.
        grid: write a captioned PNG grid of the first ``grid_count`` samples here.
        accelerator: an ``Accelerator``/``PartialState`` (default: one for the current launch).
        device: device of the feature extractor (default: the state's device).
        knn_metrics: also compute KID and precision/recall (keeps the raw features; needs them in the reference).
        on_batch: ``fn(output, start, stop)`` after each pipeline call (e.g. to read a guider's per-sample state).
        reference_samples: images ``[num_samples, C, H, W]`` in [0, 1] of the same seeds and conditioning
            (:func:`reference_solution`); sets ``rms_to_reference``.
        **call_kwargs: passed to ``pipe(...)`` unchanged: ``num_inference_steps``, ``guidance``,
            ``guidance_scale``, ``solver``, ``teleport``, ``teleport_fraction``, ... (the pipeline validates them).

    Returns:
        :class:`EvalResult`.
    """
    from .features import get_extractor

    t_start = time.perf_counter()
    _check_positive("num_samples", num_samples)
    _check_common(batch_size, grid, grid_count, kid_subsets, kid_subset_size, pr_k)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    conditioning = _conditioning(pipe, num_samples, labels, prompts)
    if reference_samples is not None and (not isinstance(reference_samples, torch.Tensor)
                                          or reference_samples.ndim != 4 or reference_samples.shape[0] != num_samples):
        raise ValueError(f"reference_samples must be a tensor [num_samples={num_samples}, C, H, W] of images in "
                         f"[0, 1] (reference_solution), got {getattr(reference_samples, 'shape', reference_samples)!r}.")
    state, device = resolve_state(accelerator, device)
    extractor = get_extractor(extractor, device=device)
    ref = load_reference(reference, extractor, state=state, keep_features=knn_metrics, progress=progress)
    num_classes = getattr(pipe, "num_classes", None) if prompts is None else None
    classify = _classifier(classifier, extractor, num_classes)

    spent = {"seconds": 0.0, "nfe": 0.0, "counted": 0, "sq": 0.0}

    def sample(start: int, stop: int):
        kwargs, batch_labels = conditioning(start, stop)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(**kwargs, seed=[seed + i for i in range(start, stop)], output_type="pt", **call_kwargs)
        spent["seconds"] += time.perf_counter() - t0
        images = out.images.float().cpu()
        if not torch.isfinite(images).all():
            raise ValueError(f"the model produced NaN or infinite pixels for seeds {seed + start}..{seed + stop - 1}.")
        nfe = getattr(out, "nfe", None)
        if nfe is not None:
            spent["nfe"] += float(nfe) * (stop - start)
            spent["counted"] += stop - start
        if on_batch is not None:
            on_batch(out, start, stop)
        if reference_samples is not None:
            spent["sq"] += squared_error_sum(images, reference_samples[start:stop])
        return images, batch_labels

    pixels, grid_items = PixelStats(), ([] if grid is not None else None)
    fake = _accumulate(sample, num_samples, extractor, state, batch_size, knn_metrics, pixels=pixels,
                       classifier=classify, grid=grid_items, grid_count=grid_count, progress=progress, desc="sampling")
    seconds, nfe_sum, counted, sq = _reduce_sum([spent["seconds"], spent["nfe"], spent["counted"], spent["sq"]], state)
    rms = None if reference_samples is None else (sq / reference_samples.numel()) ** 0.5
    result = _score(fake, ref, pixels, extractor, state, knn_metrics=knn_metrics, kid_subsets=kid_subsets,
                    kid_subset_size=kid_subset_size, pr_k=pr_k, t_start=t_start, seconds=seconds,
                    seconds_per_image=seconds / num_samples, nfe=nfe_sum / counted if counted else None,
                    rms_to_reference=rms)
    if grid is not None:
        names = getattr(getattr(pipe, "config", None), "id2label", None) or getattr(pipe, "id2label", None)
        names = {int(k): v for k, v in names.items()} if isinstance(names, dict) else None
        result.grid = _write_grid(grid_items, state, grid, grid_title or f"FID {result.fid:.2f}", names)
    return result


def reference_solution(pipe, num_samples: int, *, seed: int = 0, labels: Sequence[int] | int | None = None,
                       prompts: Sequence[str] | None = None, steps: int = REFERENCE_STEPS,
                       solver=REFERENCE_SOLVER, batch_size: int = 250, output_type: str = "pt",
                       **call_kwargs) -> torch.Tensor:
    """The reference solution of the sampler's ODE for the samples :func:`evaluate_pipeline` draws.

    Same seeds and conditioning as ``evaluate_pipeline(pipe, num_samples, seed=..., labels=..., prompts=...)``
    (sample ``i``: seed ``seed + i``) and the same guidance (``call_kwargs``: ``guidance``, ``guidance_scale``,
    ...), solved with ``steps`` steps of ``solver`` (default: 500 steps of DPM-Solver++(2M), whose error there is
    far below any few-step solver's). Pass the result as ``evaluate_pipeline(..., reference_samples=...)`` to get
    ``rms_to_reference``. Returns images ``[num_samples, C, H, W]`` in [0, 1] (``output_type="latent"``: model
    space). Teleport and solver schedules are what is measured, not part of the reference: they are refused here.
    """
    _check_positive("num_samples", num_samples)
    _check_positive("steps", steps)
    _check_positive("batch_size", batch_size)
    for name in ("num_inference_steps", "teleport", "teleport_fraction", "output_type"):
        if name in call_kwargs:
            raise ValueError(f"reference_solution sets {name} itself (steps=, solver=); got {name}={call_kwargs[name]!r}.")
    if output_type not in ("pt", "latent"):
        raise ValueError(f"output_type must be 'pt' (images in [0, 1]) or 'latent', got {output_type!r}.")
    conditioning = _conditioning(pipe, num_samples, labels, prompts)
    out = []
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        kwargs, _ = conditioning(start, stop)
        with torch.no_grad():
            res = pipe(**kwargs, seed=[seed + i for i in range(start, stop)], num_inference_steps=steps, solver=solver,
                       output_type=output_type, **call_kwargs)
        out.append(res.images.float().cpu())
    return torch.cat(out)


def _conditioning(pipe, num_samples: int, labels, prompts):
    """``fn(start, stop) -> (pipeline kwargs, labels tensor or None)`` for samples ``start..stop-1``."""
    if prompts is not None:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty sequence of strings.")
        return lambda a, b: ({"prompt": [prompts[i % len(prompts)] for i in range(a, b)]}, None)
    num_classes = getattr(pipe, "num_classes", None)
    if num_classes is None:
        raise ValueError(f"{type(pipe).__name__} is not class-conditional; give prompts=[...] for text pipelines.")
    if labels is None:
        all_labels = torch.arange(num_samples) % num_classes
    elif isinstance(labels, int) and not isinstance(labels, bool):
        all_labels = torch.full((num_samples,), labels)
    else:
        all_labels = torch.as_tensor(list(labels), dtype=torch.long)
        if all_labels.shape != (num_samples,):
            raise ValueError(f"labels must have one class per sample ({num_samples}), got {all_labels.numel()}.")
    return lambda a, b: ({"class_labels": all_labels[a:b].tolist()}, all_labels[a:b])


def evaluate_images(images, labels: Sequence[int] | None = None, *, extractor="digits", reference="builtin:digits",
                    batch_size: int = 250, classifier="auto", grid: str | Path | None = None, grid_count: int = 64,
                    grid_title: str | None = None, accelerator=None, device=None, progress: bool = True,
                    knn_metrics: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    pr_k: int = 3) -> EvalResult:
    """Score images you already have against ``reference`` (same metrics as :func:`evaluate_pipeline`).

    Args:
        images: a tensor ``[N, C, H, W]`` in [0, 1], an image folder, or ``"builtin:digits:<split>"``.
        labels: the class each image should show (for ``accuracy``; the builtin digits carry their own).
        classifier: ``"auto"`` (digits classifier with the digits extractor when labels are known), ``None`` or
            a callable ``images -> labels``.
        Other arguments: as in :func:`evaluate_pipeline`.
    """
    from .features import get_extractor

    t_start = time.perf_counter()
    _check_common(batch_size, grid, grid_count, kid_subsets, kid_subset_size, pr_k)
    if isinstance(images, torch.Tensor) and (images.ndim != 4 or images.shape[1] not in (1, 3)):
        raise ValueError(f"images must be a tensor [N, 1 or 3, H, W] in [0, 1], got shape {tuple(images.shape)}.")
    num_items, fetch = _image_source(images, "images")
    if labels is not None:
        labels = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels, dtype=torch.long)
        if labels.shape != (num_items,):
            raise ValueError(f"labels must have one class per image ({num_items}), got {labels.numel()}.")
        image_fetch = fetch
        fetch = lambda a, b: (image_fetch(a, b)[0], labels[a:b])  # noqa: E731
    state, device = resolve_state(accelerator, device)
    extractor = get_extractor(extractor, device=device)
    ref = load_reference(reference, extractor, state=state, keep_features=knn_metrics, progress=progress)
    classify = _classifier(classifier, extractor, getattr(extractor, "num_classes", None))
    pixels, grid_items = PixelStats(), ([] if grid is not None else None)
    fake = _accumulate(fetch, num_items, extractor, state, batch_size, knn_metrics, pixels=pixels, classifier=classify,
                       grid=grid_items, grid_count=grid_count, progress=progress, desc="features")
    result = _score(fake, ref, pixels, extractor, state, knn_metrics=knn_metrics, kid_subsets=kid_subsets,
                    kid_subset_size=kid_subset_size, pr_k=pr_k, t_start=t_start)
    if grid is not None:
        result.grid = _write_grid(grid_items, state, grid, grid_title or f"FID {result.fid:.2f}", None)
    return result

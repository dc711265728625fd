"""MSD: multi-student distillation over DMD2 or f-distill.

Song, Lorraine, Nie, Kreis, Lucas, *Multi-student Diffusion Distillation for Better One-step
Generators*, arXiv:2410.23274 (ICML 2025); no public code, written from the paper (spec
distillation.md section 4).

The condition space is split into K parts (:class:`Partition`); student ``G_k`` serves the conditions
of part ``k`` and a router sends each condition to its student, so generation costs one student's
forward per image while the K students together hold K times the capacity. Each student has its own
teacher-initialised fake score and discriminator head (one :class:`~.f_distill.FDistill` per part, with
``divergence="rkl"`` for DMD2, which is DMD2 bit for bit), or with ``shared_critic`` all students share one
(the critic is conditioned on the condition that routes, so one network can be every part's); the frozen
teacher is shared.

Training is one process cycling through the students: the trainer calls :meth:`MSD.begin_generator_step`
with each generator step's index and the step's critic and generator updates all go to one student,
chosen by a smooth weighted round robin (each student gets steps in proportion to its part's size, so
an imbalanced partition does not starve a student). The optimiser groups are the unions of the
students' groups; AdamW's moments are per parameter and the inactive students receive no gradient (AdamW
skips them, weight decay included), so this equals K separate optimisers stepped in turn. Conditions of a
student's batches are redrawn from its part; GAN real rows are filtered to its part.

``schedule="routed"`` trains every student in every generator step instead: the step's batch goes through
the router as at inference, each student (with its fake score and discriminator head) is updated on the rows
its part owns, and GAN real rows are filtered the same way. A generator step then costs one student's work
on the whole batch (each row meets exactly one student), and each student gets an update every step, on
about ``B / K`` rows. This is the schedule that compares with one student at equal generator steps *and*
equal samples; the cycling schedules give each student ``1 / K`` of the steps, each on a full batch.

Smaller students (``student_block_out_channels``, e.g. half width) start from random weights and are
first trained by teacher score matching (TSM, ``tsm_steps`` of their own generator steps): a diffusion
loss whose target is the guided teacher's ``x0`` at noised student samples, i.e. the teacher's score is
distilled, not the data. Then DM (+ the GAN term: the paper's ADM) as for same-size students.

Not in the paper: ``compress_from`` names a trained one-step student (``builtin:digits-1step`` or a student
pipeline folder) that smaller students first regress, ``compress_steps`` of their own steps, before TSM and DM:
each student learns that generator's map from (noise, class) to image on its part, in ``x0``, on fresh noise
every step (DMD's regression term, arXiv:2311.18828 section 3.3, with a one-step generator in place of the
teacher's ODE, so the pairs cost one evaluation each and never repeat). The critic does not train then.
``critic_warmup_steps`` then train only the critic (fake score and discriminator head) before DM begins, so the
first DM gradients come from a fake score of the student's distribution rather than the teacher's.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..parameterization import PREDICTION_TYPES
from .f_distill import FDistill, FDistillConfig
from .method import Batch, DistillMethod
from .students import Student

BASE_METHODS = ("dmd2", "fdistill")
PARTITIONS = ("balanced", "similarity")
SCHEDULES = ("proportional", "round_robin", "routed")
TSM_INPUTS = ("student", "real")
# a small student runs on the teacher's noise schedule and LCMScheduler: every parameterisation but flow matching
STUDENT_PREDICTION_TYPES = tuple(p for p in PREDICTION_TYPES if p != "flow")
POOLINGS = ("mean", "pooled")
PARTITION_FILE = "partition.json"
PART_FILE = "msd_part.json"  # a train_student run's part index, beside its partition (fastgen distill merge-msd)


# ---------------------------------------------------------------------- partition
def _balanced_assignment(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Assign rows to centroids with sizes differing by at most one: greedy over (distance, row, centroid)."""
    n, k = points.shape[0], centroids.shape[0]
    caps = [n // k + (1 if i < n % k else 0) for i in range(k)]
    dist = torch.cdist(points.double(), centroids.double())
    order = sorted(((float(dist[i, j]), i, j) for i in range(n) for j in range(k)))
    out = torch.full((n,), -1, dtype=torch.long)
    used = [0] * k
    for _, i, j in order:
        if out[i] < 0 and used[j] < caps[j]:
            out[i], used[j] = j, used[j] + 1
    return out


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 50, balanced: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (fixed ``seed``); ``balanced`` caps cluster sizes (sizes differ by
    at most one). Returns ``(centroids [k, D], assignment [N])``."""
    x = points.detach().double().cpu()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({n}), got k={k}.")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(n, (1,), generator=g)]
    while centroids.shape[0] < k:  # k-means++: next centre with probability ~ squared distance
        d2 = torch.cdist(x, centroids).min(dim=1).values ** 2
        idx = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.randint(n, (1,), generator=g)
        centroids = torch.cat([centroids, x[idx]])
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iterations):
        new = _balanced_assignment(x, centroids) if balanced else torch.cdist(x, centroids).argmin(dim=1)
        moved = not torch.equal(new, assign)
        assign = new
        for j in range(k):
            if (assign == j).any():
                centroids[j] = x[assign == j].mean(dim=0)
        if not moved:
            break
    return centroids.float(), assign


def pool_condition(cond: Mapping[str, Any], pooling: str = "mean") -> torch.Tensor:
    """One vector per row of a text condition: the token mean of ``encoder_hidden_states`` (``"mean"``) or the
    text encoder's pooled output (``"pooled"``: SDXL's ``added_cond_kwargs["text_embeds"]``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    if pooling == "pooled":
        pooled = (cond.get("added_cond_kwargs") or {}).get("text_embeds")
        if pooled is None:
            raise ValueError("pooling='pooled' needs added_cond_kwargs['text_embeds'] (SDXL); use pooling='mean'.")
        return pooled.float()
    return cond["encoder_hidden_states"].float().mean(dim=1)


@dataclass
class Partition:
    """A partition of the condition space into ``num_parts`` parts (MSD's router table).

    Class-conditional: ``class_to_part[c]`` is the part of class ``c`` (table lookup). Text: ``centroids``
    (``[K, D]``) of k-means on pooled text-encoder embeddings; a prompt goes to its nearest centroid. ``encoder``
    and ``pooling`` name what produced the embeddings, so inference pools the same way.
    """

    num_parts: int
    kind: str = "classes"
    method: str = "balanced"
    class_to_part: list[int] | None = None
    centroids: list[list[float]] | None = None
    encoder: str | None = None
    pooling: str | None = None

    def __post_init__(self):
        if isinstance(self.num_parts, bool) or not isinstance(self.num_parts, int) or self.num_parts < 1:
            raise ValueError(f"num_parts must be a positive integer, got {self.num_parts!r}.")
        if self.kind == "classes":
            table = self.class_to_part
            if not table or any(not isinstance(p, int) or not 0 <= p < self.num_parts for p in table):
                raise ValueError(f"class_to_part must list a part in [0, {self.num_parts}) per class, got {table!r}.")
            empty = sorted(set(range(self.num_parts)) - set(table))
            if empty:
                raise ValueError(f"partition parts {empty} hold no class ({len(table)} classes, {self.num_parts} parts).")
        elif self.kind == "kmeans":
            if not self.centroids or len(self.centroids) != self.num_parts:
                raise ValueError(f"centroids must hold {self.num_parts} vectors, got {self.centroids!r:.80}.")
            if self.pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}.")
        else:
            raise ValueError(f"partition kind must be 'classes' or 'kmeans', got {self.kind!r}.")

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit_classes(cls, num_classes: int, num_parts: int, method: str = "balanced",
                    features: torch.Tensor | None = None, seed: int = 0) -> "Partition":
        """Class groups of sizes differing by at most one: ``"balanced"`` (contiguous ids) or ``"similarity"``
        (balanced k-means on per-class ``features [num_classes, D]``, e.g. :func:`teacher_class_features`)."""
        if method not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {method!r}.")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_parts <= num_classes:
            raise ValueError(f"students must be between 1 and the number of classes ({num_classes}), got {num_parts!r}.")
        if method == "balanced":
            table = [c * num_parts // num_classes for c in range(num_classes)]
        else:
            if features is None or features.shape[0] != num_classes:
                raise ValueError(f"partition='similarity' needs features with one row per class ({num_classes}).")
            _, assign = kmeans(features.reshape(num_classes, -1), num_parts, seed=seed, balanced=True)
            first = {}
            for c, p in enumerate(assign.tolist()):  # number parts by their smallest class
                first.setdefault(p, len(first))
            table = [first[p] for p in assign.tolist()]
        return cls(num_parts=num_parts, kind="classes", method=method, class_to_part=table)

    @classmethod
    def fit_embeddings(cls, embeddings: torch.Tensor, num_parts: int, *, pooling: str = "mean",
                       encoder: str | None = None, seed: int = 0, balanced: bool = True) -> "Partition":
        """k-means on pooled text embeddings ``[N, D]`` of the training prompts (equal-size clusters by default)."""
        centroids, _ = kmeans(embeddings, num_parts, seed=seed, balanced=balanced)
        return cls(num_parts=num_parts, kind="kmeans", method="kmeans", centroids=centroids.tolist(),
                   encoder=encoder, pooling=pooling)

    # ------------------------------------------------------------------ use
    @property
    def num_classes(self) -> int | None:
        return len(self.class_to_part) if self.class_to_part is not None else None

    def classes_of(self, part: int) -> list[int]:
        """The classes of part ``part`` (class partitions)."""
        return [c for c, p in enumerate(self.class_to_part or []) if p == part]

    def assign(self, conditions) -> torch.Tensor:
        """The part of each row: class ids ``[B]``, pooled embeddings ``[B, D]`` or a text condition dict."""
        if self.kind == "classes":
            labels = torch.as_tensor(conditions).reshape(-1).long()
            n = len(self.class_to_part)
            if labels.numel() and (labels.min() < 0 or labels.max() >= n):
                raise ValueError(f"class ids must lie in [0, {n}) to be routed, got {labels.tolist()}.")
            return torch.tensor(self.class_to_part, device=labels.device)[labels]
        if isinstance(conditions, Mapping):
            cond = conditions.get("cond", conditions)
            conditions = pool_condition(cond, self.pooling)
        centroids = torch.tensor(self.centroids, device=conditions.device, dtype=torch.float32)
        return torch.cdist(conditions.float(), centroids).argmin(dim=1)

    def route(self, conditions, device, run) -> torch.Tensor:
        """``run(k, rows)`` for the rows each part owns (rows routed by ``conditions``, as :meth:`assign`), the
        outputs stacked back in input order: the router of training, sampling and the inference pipeline."""
        parts = self.assign(conditions).to(device)
        pieces, order = [], []
        for k in parts.unique().tolist():
            rows = (parts == k).nonzero().reshape(-1)
            pieces.append(run(k, rows))
            order.append(rows)
        return torch.cat(pieces)[torch.argsort(torch.cat(order))]

    def sizes(self) -> list[int]:
        """Classes per part (class partitions; 1 per part for k-means: clusters are balanced at fit)."""
        if self.class_to_part is None:
            return [1] * self.num_parts
        return [self.class_to_part.count(p) for p in range(self.num_parts)]

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"num_parts": self.num_parts, "kind": self.kind, "method": self.method,
                "class_to_part": self.class_to_part, "centroids": self.centroids, "encoder": self.encoder,
                "pooling": self.pooling}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Partition":
        if not isinstance(data, Mapping):
            raise ValueError(f"partition must be a mapping, got {type(data).__name__}.")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"partition has unknown fields {unknown}; accepted: {sorted(known)}.")
        return cls(**dict(data))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the partition as JSON atomically (temp file + ``os.replace``)."""
        from ..benchmarking import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Partition":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"partition file {str(path)!r} does not exist.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"partition file {str(path)!r} is not valid JSON ({err}).") from None
        return cls.from_dict(data)


@torch.no_grad()
def teacher_class_features(denoiser, num_classes: int, sample_shape: Sequence[int], *, n: int = 8, t: int = 800,
                           seed: int = 0) -> torch.Tensor:
    """Per-class teacher features for similarity partitions: the teacher's mean ``x0`` prediction of class ``c``
    from ``n`` fixed noises at timestep ``t`` (about the class's mean image at high noise), ``[num_classes, D]``."""
    device = next(denoiser.model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *sample_shape), generator=g).to(device)
    tt = torch.full((n,), t, device=device, dtype=torch.long)
    feats = []
    for c in range(num_classes):
        labels = torch.full((n,), c, device=device, dtype=torch.long)
        feats.append(denoiser.predict(noise, tt, {"class_labels": labels})[0].float().mean(dim=0).reshape(-1))
    return torch.stack(feats).cpu()


def smooth_round_robin(weights: Sequence[int]) -> list[int]:
    """One period of the smooth weighted round robin: student ``k`` appears ``weights[k]`` times, evenly spread."""
    from functools import reduce
    from math import gcd

    common = reduce(gcd, weights)
    weights = [w // common for w in weights]  # shortest period
    current = [0] * len(weights)
    total, order = sum(weights), []
    for _ in range(total):
        current = [c + w for c, w in zip(current, weights)]
        k = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[k] -= total
        order.append(k)
    return order


def _select_rows(value: Any, idx: torch.Tensor) -> Any:
    """Rows ``idx`` of a tensor or of every tensor in a nested dict (batch conditions)."""
    if isinstance(value, torch.Tensor):
        return value[idx.to(value.device)]
    if isinstance(value, Mapping):
        return {k: _select_rows(v, idx) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------- method
@dataclass
class MSDConfig(FDistillConfig):
    """The base method's options (:class:`~.f_distill.FDistillConfig`; ``base_method="dmd2"`` forces
    ``divergence="rkl"``, DMD2 exactly) plus MSD's.

    Args:
        base_method: ``"dmd2"`` or ``"fdistill"``.
        students: K, the number of students (and parts).
        partition: ``"balanced"`` (contiguous class groups) or ``"similarity"`` (balanced k-means on the
            teacher's per-class features); ignored with ``partition_file``.
        partition_file: a saved :class:`Partition` (JSON) to use instead of fitting one (required for text
            teachers: fit it with :meth:`Partition.fit_embeddings` on the training prompts).
        schedule: ``"proportional"`` (generator steps per student proportional to its part's size),
            ``"round_robin"``, or ``"routed"`` (every step trains every student on the batch rows its part owns).
        student_block_out_channels: smaller students (e.g. half the teacher's widths), randomly initialised;
            ``None``: students are teacher copies.
        student_prediction_type: what smaller students predict (``"epsilon"``, ``"sample"``, ``"v_prediction"``;
            ``None``: the teacher's). A one-step student's ``x0 = (z - sigma eps)/alpha`` at ``t*`` multiplies its
            epsilon errors by ``sigma/alpha`` (3.4 at ``t* = 500`` of the digits teacher); a random-init student
            is free to predict ``x0`` directly. Teacher copies keep the teacher's parameterisation.
        tsm_steps: a student's own generator steps of teacher score matching before DM (smaller students).
        tsm_time: timestep range of TSM.
        tsm_inputs: what TSM noises: ``"student"`` (the student's own detached samples) or ``"real"`` (the rows
            of the real-data batch of the part, with their own classes: the small network learns the teacher's
            denoiser on the data manifold, as a diffusion model distilled from the teacher; needs ``dataset``).
        tsm_lr_scale: multiplier of the generator's learning rate during TSM (a random-init student trains
            from scratch there; the distillation rate that suits a teacher-initialised student is far too small).
        compress_from: a trained one-step student (``builtin:<name>`` or a ``FastGenStudentPipeline`` folder)
            that the students first regress (``x0`` MSE on fresh noise and the part's classes; see the module
            docstring); needs ``compress_steps``.
        compress_steps: a student's own generator steps of that regression, before TSM and DM (the critic and
            discriminator do not train in them).
        compress_lr_scale: multiplier of the generator's learning rate during the regression.
        critic_warmup_steps: a student's own generator steps, after the regression and TSM and before DM, in which
            only its fake score and discriminator train (the generator stands still; its schedule advances). Both
            start from the teacher, far from a student that was not. Measured on digits (one half-width student
            after the regression, ``distill/digits-1step-half.yaml``), it buys little: after 100 warm-up steps,
            DM at 3e-6 reaches FID 1.75/1.35/1.25 after 100/400/500 DM steps, without them 2.00/1.48/1.36, but at
            equal generator steps the two runs are level (1.35 vs 1.36 at step 1,500). The generator rate is
            what mattered: at 3e-5, DM took FID 1.62 to 2.67 in 100 steps even after 100 warm-up steps.
        shared_critic: one fake score and one discriminator head for all students instead of one per student.
            The critic is conditioned on the same class or prompt that routes a row, so one conditional fake
            score of the students' mixture is the K per-part fake scores in one network; it learns from every
            row of every step (with the routed schedule: the whole batch, where a per-student critic sees ~B/K
            rows) and keeps one copy of the teacher in memory for the critic instead of K. AdamW gives each
            per-part critic a full step on its rows, the shared one a single step for all parts: at the same
            rates it follows each part K times more slowly (the digits recipe measured it at 4x the critic and
            discriminator rates). With ``schedule="routed"`` the step is the base method's on the whole batch,
            with the router as its generator (one teacher and critic call per step).
        train_student: train student ``k`` only (its part's conditions, its own fake score and discriminator
            head; the other students are not built): one of K independent runs, each on its own ``accelerate``
            processes (its own process group, machines or GPUs), as the paper trains its students. The run
            exports that student alone; :func:`merge_students` (``fastgen distill merge-msd``) joins the K runs'
            students into one routed pipeline. Every step trains it on a full batch of its part (``schedule``
            does not apply); in-training evaluation, which samples every class, is off (``validation_steps 0``).
        output_dir: the run folder (the trainer passes its own); the partition is saved there.
    """

    base_method: str = "dmd2"
    students: int = 4
    partition: str = "balanced"
    partition_file: str | None = None
    schedule: str = "proportional"
    student_block_out_channels: Sequence[int] | None = None
    student_prediction_type: str | None = None
    tsm_steps: int = 0
    tsm_time: tuple[int, int] = (0, 999)
    tsm_inputs: str = "student"
    tsm_lr_scale: float = 1.0
    compress_from: str | None = None
    compress_steps: int = 0
    compress_lr_scale: float = 1.0
    critic_warmup_steps: int = 0
    shared_critic: bool = False
    train_student: int | None = None
    output_dir: str | None = None

    def __post_init__(self):
        if self.base_method not in BASE_METHODS:
            raise ValueError(f"base_method must be one of {BASE_METHODS}, got {self.base_method!r}.")
        if self.base_method == "dmd2":
            self.divergence = "rkl"
        FDistillConfig.__post_init__(self)
        if isinstance(self.students, bool) or not isinstance(self.students, int) or self.students < 1:
            raise ValueError(f"students must be a positive integer, got {self.students!r}.")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {self.partition!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if isinstance(self.tsm_steps, bool) or not isinstance(self.tsm_steps, int) or self.tsm_steps < 0:
            raise ValueError(f"tsm_steps must be a non-negative integer, got {self.tsm_steps!r}.")
        from .dmd2 import _check_time_range
        self.tsm_time = _check_time_range("tsm_time", tuple(self.tsm_time))
        if self.tsm_inputs not in TSM_INPUTS:
            raise ValueError(f"tsm_inputs must be one of {TSM_INPUTS}, got {self.tsm_inputs!r}.")
        if isinstance(self.tsm_lr_scale, bool) or not isinstance(self.tsm_lr_scale, (int, float)) or self.tsm_lr_scale <= 0:
            raise ValueError(f"tsm_lr_scale must be a positive number, got {self.tsm_lr_scale!r}.")
        if isinstance(self.compress_steps, bool) or not isinstance(self.compress_steps, int) or self.compress_steps < 0:
            raise ValueError(f"compress_steps must be a non-negative integer, got {self.compress_steps!r}.")
        if (self.compress_steps > 0) != (self.compress_from is not None):
            raise ValueError(f"compress_from and compress_steps go together (a one-step student to regress and the "
                             f"steps to do it), got compress_from={self.compress_from!r}, "
                             f"compress_steps={self.compress_steps!r}.")
        if self.compress_from is not None:
            check_student_source(self.compress_from)
        if (isinstance(self.compress_lr_scale, bool) or not isinstance(self.compress_lr_scale, (int, float))
                or self.compress_lr_scale <= 0):
            raise ValueError(f"compress_lr_scale must be a positive number, got {self.compress_lr_scale!r}.")
        if (isinstance(self.critic_warmup_steps, bool) or not isinstance(self.critic_warmup_steps, int)
                or self.critic_warmup_steps < 0):
            raise ValueError(f"critic_warmup_steps must be a non-negative integer, got {self.critic_warmup_steps!r}.")
        if not isinstance(self.shared_critic, bool):
            raise ValueError(f"shared_critic must be true or false, got {self.shared_critic!r}.")
        if self.train_student is not None and (isinstance(self.train_student, bool)
                                               or not isinstance(self.train_student, int)
                                               or not 0 <= self.train_student < self.students):
            raise ValueError(f"train_student must be a student index in 0..{self.students - 1} (students = "
                             f"{self.students}) or None, got {self.train_student!r}.")
        if self.student_block_out_channels is not None:
            ch = list(self.student_block_out_channels)
            if not ch or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in ch):
                raise ValueError(f"student_block_out_channels must be a list of positive integers, got {ch!r}.")
            self.student_block_out_channels = tuple(ch)
        if self.student_prediction_type is not None:
            if self.student_prediction_type not in STUDENT_PREDICTION_TYPES:
                raise ValueError(f"student_prediction_type must be one of {STUDENT_PREDICTION_TYPES} or None, got "
                                 f"{self.student_prediction_type!r}.")
            if self.student_block_out_channels is None:
                raise ValueError("student_prediction_type needs student_block_out_channels: a teacher-initialised "
                                 "student keeps the teacher's parameterisation.")
        if self.lora_student or self.lora_fake_score:
            raise ValueError("msd: lora_student / lora_fake_score are not supported (K adapters would share one name).")

    @property
    def serves_every_condition(self) -> bool:
        """Whether the run's students cover every condition (not a ``train_student`` run), which the trainer's
        in-training evaluation needs."""
        return self.train_student is None

    def base_config(self) -> FDistillConfig:
        """The per-student base method's config."""
        from dataclasses import fields

        return FDistillConfig(**{f.name: getattr(self, f.name) for f in fields(FDistillConfig)})


def check_student_source(spec: str) -> None:
    """``compress_from`` before anything loads: a built-in name or a folder whose pipeline is a one-step student."""
    from ..builtin import builtin_path, check_model_folder

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"compress_from must be 'builtin:<name>' or a student pipeline folder, got {spec!r}.")
    folder = builtin_path(spec.split(":", 1)[1]) if spec.startswith("builtin:") else Path(spec)
    index = check_model_folder(folder)
    name = index.get("_class_name")
    name = name[1] if isinstance(name, list) else str(name)
    timesteps = index.get("student_timesteps")
    if "Student" not in name or not isinstance(timesteps, list) or len(timesteps) != 1:
        raise ValueError(f"compress_from must be a one-step student pipeline (FastGenStudentPipeline with one "
                         f"timestep, as fastgen distill exports), got {spec!r}: {name}, timesteps {timesteps!r}.")


def load_student_source(spec: str) -> Student:
    """The frozen one-step generator of ``compress_from`` (checked by :class:`MSDConfig`) as a
    :class:`~.students.Student`."""
    from ..builtin import load_pipeline
    from ..denoiser import Denoiser

    pipe = load_pipeline(spec)
    net = pipe.network.float().eval().requires_grad_(False)
    den = Denoiser.from_scheduler(net, pipe.scheduler)
    return Student(net, den.schedule, den.prediction_type, pipe.student_timesteps, renoise=pipe.student_renoise)


def small_network(teacher_network: torch.nn.Module, block_out_channels: Sequence[int], seed: int) -> torch.nn.Module:
    """A randomly initialised network of the teacher's class and config with other ``block_out_channels``."""
    cfg = dict(teacher_network.config)
    if "block_out_channels" not in cfg:
        raise ValueError(f"student_block_out_channels: {type(teacher_network).__name__} has no block_out_channels.")
    if len(block_out_channels) != len(cfg["block_out_channels"]):
        raise ValueError(f"student_block_out_channels must have {len(cfg['block_out_channels'])} entries like the "
                         f"teacher's {list(cfg['block_out_channels'])}, got {list(block_out_channels)}.")
    cfg["block_out_channels"] = list(block_out_channels)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    try:
        return type(teacher_network).from_config(cfg).float().train()
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"student_block_out_channels {list(block_out_channels)} do not build a "
                         f"{type(teacher_network).__name__} (check norm_num_groups / attention_head_dim): {err}") from None


def _share_critic(part: FDistill, owner: FDistill) -> None:
    """Make ``part`` use ``owner``'s fake score and discriminator head (``shared_critic``)."""
    part.fake_network = owner.fake_network
    part._fake_params = owner._fake_params
    for name in ("fake_denoiser", "fake_score", "tap"):
        if name in owner.__dict__:
            part.__dict__[name] = owner.__dict__[name]
    if owner.config.use_gan:
        part.discriminator = owner.discriminator


class MSD(DistillMethod):
    """Multi-student distillation (arXiv:2410.23274) over DMD2 / f-distill; see the module docstring.

    Args:
        teacher: as :class:`~.dmd2.DMD2` (a Denoiser or a Teacher bundle).
        guider: the teacher's guidance.
        config: :class:`MSDConfig`; keyword options override its fields.
        partition: a ready :class:`Partition` (overrides ``config.partition``/``partition_file``).
    """

    name = "msd"
    config_class = MSDConfig

    def __init__(self, teacher, guider=None, config: MSDConfig | None = None, partition: Partition | None = None,
                 **options):
        super().__init__()
        config = config or MSDConfig()
        if options:
            from dataclasses import fields
            known = {f.name for f in fields(config)}
            unknown = sorted(set(options) - known)
            if unknown:
                raise TypeError(f"unknown {self.name} options {unknown}; accepted: {sorted(known)}.")
            config = MSDConfig(**{**{f.name: getattr(config, f.name) for f in fields(config)}, **options})
        self.config = c = config
        base = c.base_config()
        # the partition index of each built student: all K, or the one of a train_student run
        self.part_ids = list(range(c.students)) if c.train_student is None else [c.train_student]
        parts = []
        for _ in self.part_ids:
            parts.append(FDistill(teacher, guider, base))
            if c.shared_critic and len(parts) > 1:
                _share_critic(parts[-1], parts[0])  # the new part's own copies are freed here
        self.parts = torch.nn.ModuleList(parts)
        first = parts[0]
        self.set_teacher(first.teacher)
        self.__dict__["teacher_denoiser"] = first.teacher_denoiser
        self.null_label = first.null_label
        self.needs_real_data = first.needs_real_data or (c.tsm_steps > 0 and c.tsm_inputs == "real")
        self.partition = partition or self._make_partition()
        if self.partition.num_parts != c.students:
            raise ValueError(f"the partition has {self.partition.num_parts} parts for {c.students} students.")
        if c.student_block_out_channels is not None:
            net = first.teacher_denoiser.model
            for k, part in zip(self.part_ids, parts):  # student k starts alike in a joint or a train_student run
                small = small_network(net, c.student_block_out_channels, seed=1000 + k)
                part.student_module = Student(small, first.teacher_denoiser.schedule,
                                              c.student_prediction_type or first.teacher_denoiser.prediction_type,
                                              base.student_timesteps, renoise=base.student_renoise,
                                              step_draw=base.student_step_draw,
                                              grad_space=base.student_grad_space)
                part._student_params = list(small.parameters())
        if c.compress_from is not None:  # frozen, not a submodule: neither trained nor checkpointed
            self.__dict__["compress_source"] = load_student_source(c.compress_from)
        if c.train_student is not None:
            self.order = [0]  # its one student, every step
        else:
            self.order = smooth_round_robin(self.partition.sizes() if c.schedule == "proportional" else [1] * c.students)
        self.begin_generator_step(0)
        if c.output_dir is not None:
            self.partition.save(Path(c.output_dir) / PARTITION_FILE)
            if c.train_student is not None:
                from ..benchmarking import write_json
                write_json(Path(c.output_dir) / PART_FILE, {"part": c.train_student, "students": c.students})

    def _make_partition(self) -> Partition:
        c = self.config
        if c.partition_file is not None:
            return Partition.load(c.partition_file)
        if self.null_label is None:
            raise ValueError("msd: a text-conditional teacher needs partition_file (k-means on the training prompts' "
                             "pooled embeddings, Partition.fit_embeddings).")
        num_classes = int(self.null_label)
        features = None
        if c.partition == "similarity":
            net = self.teacher_denoiser.model
            shape = (net.config.in_channels, *([net.config.sample_size] * 2
                                               if isinstance(net.config.sample_size, int) else net.config.sample_size))
            features = teacher_class_features(self.teacher_denoiser, num_classes, shape)
        return Partition.fit_classes(num_classes, c.students, c.partition, features)

    # ------------------------------------------------------------------ schedule
    @property
    def routed(self) -> bool:
        return self.config.schedule == "routed" and self.config.train_student is None

    def _student_of_part(self, k: int) -> FDistill:
        """The built student (with its critic) of partition part ``k``."""
        if k not in self.part_ids:
            raise ValueError(f"msd: this run trains student {self.part_ids[0]} only (train_student); a condition of "
                             f"part {k} has no student here. Join the K runs with fastgen distill merge-msd.")
        return self.parts[self.part_ids.index(k)]

    def student_at(self, step: int) -> int | None:
        """The student trained in generator step ``step`` (``None`` with the routed schedule: all of them)."""
        return None if self.routed else self.order[step % len(self.order)]

    def own_steps(self, k: int, step: int) -> int:
        """Generator steps student ``k`` had before step ``step``."""
        if self.routed:
            return step
        period, rest = divmod(step, len(self.order))
        return period * self.order.count(k) + self.order[:rest].count(k)

    def begin_generator_step(self, step: int) -> None:
        """Trainer hook: activate the student of generator step ``step`` (and its TSM or DM phase)."""
        c = self.config
        self.active = self.student_at(step)
        own = self.own_steps(self.active or 0, step)  # routed: active None, every student has had `step`
        pre = c.compress_steps + c.tsm_steps  # own steps before the critic warm-up and DM
        self.in_compress = own < c.compress_steps
        self.in_tsm = not self.in_compress and own < pre
        self.in_critic_warmup = pre <= own < pre + c.critic_warmup_steps

    @property
    def trains_critic(self) -> bool:
        """No critic or discriminator update while the step's student(s) regress ``compress_from``."""
        return not getattr(self, "in_compress", False)

    @property
    def trains_generator(self) -> bool:
        """No generator update in the step's student's critic warm-up (``critic_warmup_steps``)."""
        return not getattr(self, "in_critic_warmup", False)

    def learning_rate_scale(self, group: str) -> float:
        """``compress_lr_scale`` / ``tsm_lr_scale`` for the generator in those stages, else 1."""
        if group != "generator":
            return 1.0
        if getattr(self, "in_compress", False):
            return float(self.config.compress_lr_scale)
        return float(self.config.tsm_lr_scale) if getattr(self, "in_tsm", False) else 1.0

    @property
    def _pretraining(self) -> bool:
        return getattr(self, "in_compress", False) or getattr(self, "in_tsm", False)

    # ------------------------------------------------------------------ contract
    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        groups: dict[str, list[torch.nn.Parameter]] = {}
        seen: set[int] = set()  # a shared critic's parameters are listed once
        for part in self.parts:
            for name, params in part.optimizer_groups().items():
                group = groups.setdefault(name, [])
                group.extend(p for p in params if id(p) not in seen)
                seen.update(id(p) for p in params)
        return groups

    def student(self) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([part.student_module for part in self.parts])

    def student_networks(self) -> list[torch.nn.Module]:
        return [part.student_network() for part in self.parts]

    def export_pipeline(self, teacher_pipeline):
        """The routed pipeline (:class:`~fastgen.pipelines.msd.FastGenMSDPipeline`) of the K students; a
        ``train_student`` run's one student as a :class:`~fastgen.pipelines.student.FastGenStudentPipeline`."""
        from ..pipelines.msd import FastGenMSDPipeline

        if self.config.train_student is not None:
            from ..pipelines.student import FastGenStudentPipeline

            return FastGenStudentPipeline.from_teacher(teacher_pipeline, self.student_networks()[0],
                                                       list(self.config.student_timesteps), self.config.student_renoise,
                                                       prediction_type=self.config.student_prediction_type)

        return FastGenMSDPipeline.from_students(teacher_pipeline, self.student_networks(),
                                                list(self.config.student_timesteps), self.partition,
                                                prediction_type=self.config.student_prediction_type,
                                                student_renoise=self.config.student_renoise)

    def _part_batch(self, batch: Batch, i: int) -> Batch:
        """``batch`` restricted to the part of built student ``i``: class labels redrawn from the part, text rows
        selected, real rows filtered to the part (all real rows when none falls in it)."""
        k = self.part_ids[i]
        g = batch.generator
        labels, noise = batch.labels, batch.noise
        if self.partition.kind == "classes":
            classes = torch.tensor(self.partition.classes_of(k), device=g.device)
            pick = torch.randint(len(classes), (noise.shape[0],), generator=g, device=g.device)
            labels = classes[pick].to(labels.device)
        else:
            rows = (self.partition.assign(labels) == k).nonzero().reshape(-1)
            if rows.numel():
                labels, noise = _select_rows(labels, rows), noise[rows.to(noise.device)]
        return Batch(labels=labels, noise=noise, generator=g, **self._real_of_part(batch, k))

    def _real_of_part(self, batch: Batch, k: int) -> dict[str, Any]:
        """``real`` / ``real_labels`` of ``batch`` filtered to part ``k`` (all real rows when none falls in it)."""
        real, real_labels = batch.real, batch.real_labels
        if real is not None and real_labels is not None:
            rows = (self.partition.assign(real_labels) == k).nonzero().reshape(-1)
            if rows.numel():
                real, real_labels = real[rows.to(real.device)], _select_rows(real_labels, rows)
        return {"real": real, "real_labels": real_labels}

    def _routed_batches(self, batch: Batch) -> list[tuple[int, float, Batch]]:
        """The routed schedule's split of ``batch``: ``(k, share of the rows, rows of part k)`` for every part
        that owns rows; GAN real rows filtered to each part (all real rows when none falls in it)."""
        parts = self.partition.assign(batch.labels)
        out = []
        for k in range(len(self.parts)):
            rows = (parts == k).nonzero().reshape(-1)
            if rows.numel():
                sub = Batch(labels=_select_rows(batch.labels, rows), noise=batch.noise[rows.to(batch.noise.device)],
                            generator=batch.generator, **self._real_of_part(batch, k))
                out.append((k, rows.numel() / parts.numel(), sub))
        return out

    def _student_loss(self, k: int, batch: Batch) -> dict[str, torch.Tensor]:
        part = self.parts[k]
        if getattr(self, "in_compress", False):
            loss = self.compress_loss(part, batch)
            return {"loss": loss, "compress": loss.detach()}
        if getattr(self, "in_tsm", False):
            loss = self.tsm_loss(part, batch)
            return {"loss": loss, "tsm": loss.detach()}
        return part.generator_loss(batch)

    @staticmethod
    def _share_sum(results: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """Row-share-weighted sum of the per-student loss dicts (the batch mean over all rows)."""
        out: dict[str, torch.Tensor] = {}
        for share, res in results:
            for key, value in res.items():
                out[key] = out.get(key, 0.0) + share * value
        return out

    def _route(self, noise: torch.Tensor, cond: Mapping[str, Any], generator=None,
               step: int | torch.Tensor | None = None) -> torch.Tensor:
        """The K students as one training generator: each row through its part's student (with gradient); a
        tensor ``step`` gives each row its own step."""
        key = cond.get("class_labels") if self.partition.kind == "classes" else cond
        return self.partition.route(key, noise.device, lambda k, rows: self.parts[k].student_module(
            noise[rows], _select_rows(cond, rows), generator,
            step=step[rows.to(step.device)] if isinstance(step, torch.Tensor) else step))

    @property
    def batched(self) -> bool:
        """Routed schedule with one shared critic: the step is the base method's on the whole batch, its
        generator the router (one teacher, fake-score and discriminator call per step instead of K)."""
        return self.routed and self.config.shared_critic

    def generator_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.batched and not self._pretraining:
            return {**self.parts[0].generator_loss(batch, student=self._route), "student": torch.tensor(-1.0)}
        if self.routed:
            out = self._share_sum([(share, self._student_loss(k, sub)) for k, share, sub in self._routed_batches(batch)])
            out["student"] = torch.tensor(-1.0)  # every student
            return out
        out = self._student_loss(self.active, self._part_batch(batch, self.active))
        out["student"] = torch.tensor(float(self.active))
        return out

    def critic_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.batched:
            return self.parts[0].critic_loss(batch, student=self._route)
        if self.routed:
            return self._share_sum([(share, self.parts[k].critic_loss(sub))
                                    for k, share, sub in self._routed_batches(batch)])
        return self.parts[self.active].critic_loss(self._part_batch(batch, self.active))

    def compress_loss(self, part: FDistill, batch: Batch) -> torch.Tensor:
        """Regression on ``compress_from``: mean squared ``x0`` difference between the student and the frozen
        one-step generator on the same noise and conditions (the batch's, drawn from the student's part)."""
        source = self.__dict__["compress_source"]
        if source.network.device != batch.noise.device:
            source.network.to(batch.noise.device)
        cond, _ = part._conditions(batch.labels)
        with torch.no_grad():
            target = source.sample(batch.noise, cond, batch.generator)
        pred = part.student_module(batch.noise, cond, batch.generator)
        return F.mse_loss(pred.float(), target.float())

    def tsm_loss(self, part: FDistill, batch: Batch) -> torch.Tensor:
        """Teacher score matching: the student network as a denoiser regresses the guided teacher at noised
        inputs, ``t ~ U[tsm_time]`` (:meth:`tsm_gap`); the inputs are the student's own detached samples or,
        with ``tsm_inputs="real"``, the part's real rows under their own conditions."""
        g = batch.generator
        if self.config.tsm_inputs == "real":
            if batch.real is None or batch.real_labels is None:
                raise ValueError("msd: tsm_inputs='real' needs labelled real data (the dataset option).")
            x0 = batch.real.to(batch.noise.dtype)
            cond, uncond = part._conditions(batch.real_labels)
        else:
            cond, uncond = part._conditions(batch.labels)
            with torch.no_grad():
                x0 = part.student_module(batch.noise, cond, g).detach()
        t = part._timesteps(self.config.tsm_time, x0.shape[0], g, x0.device)
        return self.tsm_gap(part, part._noised(x0, t, g), t, cond, uncond)

    @staticmethod
    def tsm_gap(part: FDistill, x_t, t, cond, uncond) -> torch.Tensor:
        """Mean squared difference between the student network's raw output and the guided teacher's, in the
        network's own parameterisation (epsilon for the digits teacher: well conditioned at every t, where
        ``x0`` errors blow up as alpha_t -> 0)."""
        target = part.student_module.denoiser.from_x0(part._teacher_x0(x_t, t, cond, uncond), x_t, t)
        pred = part.student_module.denoiser(x_t, t, cond)
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, labels: Any, generator=None) -> torch.Tensor:
        """Route each row to its student; outputs in input order."""
        return self.partition.route(labels, noise.device, lambda k, rows: self._student_of_part(k).sample(
            noise[rows], _select_rows(labels, rows), generator).to(noise.dtype))

    # ------------------------------------------------------------------ trainer state
    def trainer_state(self) -> dict:
        return {"parts": {str(k): part.trainer_state() for k, part in zip(self.part_ids, self.parts)},
                "partition": json.dumps(self.partition.to_dict())}

    def load_trainer_state(self, state: dict) -> None:
        if not state:
            return
        saved = Partition.from_dict(json.loads(state["partition"]))
        if saved != self.partition:
            raise ValueError(f"msd: the checkpoint was trained with another partition ({saved.to_dict()}); resume "
                             f"with the same options, or pass it as partition_file.")
        for k, part in zip(self.part_ids, self.parts):
            part.load_trainer_state(state["parts"][str(k)])


# ---------------------------------------------------------------------- independent runs
def merge_students(runs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
    """Join the students of K ``train_student`` runs (one per part, e.g. each on its own ``accelerate``
    processes) into one routed :class:`~fastgen.pipelines.msd.FastGenMSDPipeline` folder at ``output_dir``.

    Each run folder holds ``partition.json``, ``msd_part.json`` (its part) and ``student/`` (its exported
    student). The runs must share one partition and student setup, and cover every part exactly once; any
    mismatch is one error before anything is written. ``output_dir`` must not exist yet (nothing is overwritten);
    the folder is written beside it and renamed into place.
    """
    from ..pipelines.msd import FastGenMSDPipeline
    from ..pipelines.student import FastGenStudentPipeline

    folders = [Path(r) for r in runs]
    if not folders:
        raise ValueError("runs: pass the K train_student run folders to join, got none.")
    out = Path(output_dir)
    if out.exists():
        raise FileExistsError(f"output_dir {str(out)!r} exists; merge-msd writes a new folder and never overwrites one.")
    parts, partition = {}, None
    for folder in folders:
        for name in (PARTITION_FILE, PART_FILE, "student/model_index.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"runs: {str(folder)!r} is not a finished train_student run (no {name}); "
                                        f"train it with fastgen distill --method msd --train-student K first.")
        run_partition = Partition.load(folder / PARTITION_FILE)
        if partition is None:
            partition = run_partition
        elif run_partition != partition:
            raise ValueError(f"runs: {str(folder)!r} was trained with another partition than {str(folders[0])!r}; "
                             f"train every part with the same partition options (or one partition_file).")
        part = int(json.loads((folder / PART_FILE).read_text())["part"])
        if part in parts:
            raise ValueError(f"runs: {str(parts[part])!r} and {str(folder)!r} both trained student {part}.")
        parts[part] = folder
    missing = sorted(set(range(partition.num_parts)) - set(parts))
    if missing:
        raise ValueError(f"runs: the partition has {partition.num_parts} parts and no run trained student(s) {missing}.")
    pipes = [FastGenStudentPipeline.from_pretrained(parts[k] / "student") for k in range(partition.num_parts)]
    first = pipes[0]
    setup = [(p.student_timesteps, p.student_renoise, p.scheduler.config.prediction_type) for p in pipes]
    if any(s != setup[0] for s in setup):
        raise ValueError(f"runs: the students differ in (timesteps, re-noising, prediction type): "
                         f"{dict(enumerate(setup))}.")
    pipe = FastGenMSDPipeline.from_students(first, [p.network for p in pipes], first.student_timesteps, partition,
                                            prediction_type=setup[0][2], student_renoise=first.student_renoise)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    os.replace(tmp, out)
    return out

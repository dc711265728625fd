"""DisBack: distribution backtracking over DMD2 or f-distill.

Zhang et al., *Distribution Backtracking Builds A Faster Convergence Trajectory for Diffusion
Distillation*, arXiv:2408.15991 (code: SYZhang0805/DisBack, MIT; re-implemented from the algorithm,
spec distillation.md sections 0.11, 3).

Early in distribution matching the student's samples lie where the teacher's score is unreliable.
DisBack replaces the fixed target by a path of targets that runs from (near) the student back to the
teacher. One run of the trainer does both stages; every budget counts generator steps::

    stage 1, degradation recording   steps [0, N * record_interval)
        the generator is frozen (its initial weights G_0); the critic phase trains the fake score,
        starting from the teacher, by DSM on G_0's samples with label dropout (so the unconditional
        branch stays meaningful under CFG, spec 0.11); node j = the fake score after j * record_interval
        steps is written to <output_dir>/disback_nodes/node-<j>.safetensors (j = 1..N; node 0 is the teacher).
        With ``record_discriminator`` the GAN discriminator head also trains here, on G_0's samples.
    stage 2, backtracking             steps [N * record_interval, ...)
        the fake score continues from node N (it *is* the stage-1 network, so it starts equal to node N);
        the base method's generator loss uses node k as its "real" score (with the teacher's guidance),
        k = N-1, N-2, ..., 0, advancing every `interval` steps; k = 0 is the teacher, kept to the end.
        With ``advance="plateau"`` a node is left early once the in-training FID has stopped improving on it
        (``plateau_patience`` evaluations in a row without a relative gain above ``plateau_tolerance``; the
        paper's alternative to a fixed interval), at the latest after `interval` steps.

Nodes are full weights, or with ``lora_fake_score`` only the fake score's LoRA deltas on the frozen
teacher base (loaded into a second, frozen adapter ``disback_node``). The node index and the switch
history are trainer state; a resumed run reloads the current node from its file. The trainer calls
:meth:`DisBack.begin_generator_step` with each step's index; with ``advance="interval"`` the schedule is a
function of that index, with ``"plateau"`` also of the evaluations the trainer reports through
:meth:`DisBack.observe_evaluation` (their counters are trainer state too, so a resumed run does the same).
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..denoiser import Denoiser, GuidedDenoiser
from .checkpoint import CheckpointError
from .dmd2 import cfg_x0
from .f_distill import FDistill, FDistillConfig
from .method import Batch

BASE_METHODS = ("dmd2", "fdistill")
ADVANCE = ("interval", "plateau")
NODE_ADAPTER = "disback_node"
NODE_FOLDER = "disback_nodes"


@dataclass
class DisBackConfig(FDistillConfig):
    """The base method's options (:class:`~.f_distill.FDistillConfig`; ``base_method="dmd2"`` is f-distill
    with ``divergence="rkl"``, which is DMD2 bit for bit) plus DisBack's.

    Args:
        base_method: ``"dmd2"`` or ``"fdistill"`` (``divergence`` is ignored for ``"dmd2"``).
        nodes: N, the number of recorded degradation nodes (node 0, the teacher, is not stored).
        record_interval: stage-1 generator steps between two nodes (each is ``critic_steps_per_generator_step``
            DSM updates of the fake score; the generator is frozen).
        interval: stage-2 generator steps spent on each node before backtracking to the next one (with
            ``advance="plateau"``: at most).
        advance: ``"interval"`` (every ``interval`` steps) or ``"plateau"`` (also as soon as the in-training FID
            of the current node has plateaued; needs the trainer's evaluations, ``validation_steps > 0``).
        plateau_patience: evaluations in a row without improvement that make a plateau.
        plateau_tolerance: an evaluation improves when its FID is below ``(1 - plateau_tolerance)`` times the
            best one seen on the current node.
        label_dropout: probability of the null condition in stage-1 DSM.
        record_discriminator: also train the GAN discriminator head in stage 1, on G_0's samples against real
            data (the base method's discriminator loss and rate), so stage 2 starts with a discriminator fitted to
            the initial student instead of a fresh one. The paper's stage 2 starts from a DMD2 checkpoint whose
            critic, classifier head included, is already trained; with an untrained head a strong GAN term
            (the digits recipe's weight 1.0) moves the student at random for its first updates. Needs the GAN
            term (``gan_weight_discriminator > 0``).
        output_dir: the run folder (the trainer passes its own); nodes go to ``<output_dir>/disback_nodes``.
        node_dir: another folder for the nodes.
    """

    base_method: str = "dmd2"
    nodes: int = 4
    record_interval: int = 25
    interval: int = 50
    advance: str = "interval"
    plateau_patience: int = 2
    plateau_tolerance: float = 0.01
    label_dropout: float = 0.1
    record_discriminator: bool = False
    output_dir: str | None = None
    node_dir: str | None = None

    def __post_init__(self):
        if self.base_method not in BASE_METHODS:
            raise ValueError(f"base_method must be one of {BASE_METHODS}, got {self.base_method!r}.")
        if self.base_method == "dmd2":
            self.divergence = "rkl"  # f-distill's rkl path is DMD2 exactly (spec 0.1)
        FDistillConfig.__post_init__(self)
        if self.advance not in ADVANCE:
            raise ValueError(f"advance must be one of {ADVANCE}, got {self.advance!r}.")
        if isinstance(self.plateau_tolerance, bool) or not isinstance(self.plateau_tolerance, (int, float)) \
                or not 0.0 <= self.plateau_tolerance < 1.0:
            raise ValueError(f"plateau_tolerance must be a number in [0, 1), got {self.plateau_tolerance!r}.")
        for name in ("nodes", "record_interval", "interval", "plateau_patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if isinstance(self.label_dropout, bool) or not isinstance(self.label_dropout, (int, float)) \
                or not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be a number in [0, 1), got {self.label_dropout!r}.")
        if not isinstance(self.record_discriminator, bool):
            raise ValueError(f"record_discriminator must be true or false, got {self.record_discriminator!r}.")
        if self.record_discriminator and not self.use_gan:
            raise ValueError("record_discriminator: true needs the GAN term (gan_weight_discriminator > 0); "
                             "without it there is no discriminator head to train.")

    @property
    def recording_steps(self) -> int:
        """Generator steps of stage 1 (``nodes * record_interval``)."""
        return self.nodes * self.record_interval

    @property
    def needs_fid(self) -> bool:
        """Whether the run must report in-training FID evaluations (``advance="plateau"``)."""
        return self.advance == "plateau"

    def node_at(self, step: int) -> int | None:
        """The real-score node of generator step ``step`` with ``advance="interval"``: ``None`` in stage 1, then
        N-1, ..., 0 (teacher)."""
        if step < self.recording_steps:
            return None
        return max(self.nodes - 1 - (step - self.recording_steps) // self.interval, 0)


def _where_rows(drop: torch.Tensor, a: Any, b: Any) -> Any:
    """Row-wise ``b if drop else a`` through nested dicts of ``[B, ...]`` tensors (condition kwargs)."""
    if isinstance(a, torch.Tensor):
        mask = drop.to(a.device).reshape((-1,) + (1,) * (a.ndim - 1))
        return torch.where(mask, b.to(a.dtype), a)
    if isinstance(a, Mapping):
        return {k: _where_rows(drop, v, b[k]) for k, v in a.items()}
    return a


class DisBack(FDistill):
    """DisBack (arXiv:2408.15991) over DMD2 or f-distill; see the module docstring."""

    name = "disback"
    config_class = DisBackConfig

    def __init__(self, teacher, guider=None, config: DisBackConfig | None = None, **options):
        super().__init__(teacher, guider, config, **options)
        c = self.config
        if c.node_dir is None and c.output_dir is None:
            raise ValueError("node_dir: DisBack stores its nodes in a folder; pass output_dir (the run folder) or node_dir.")
        self.node_dir = Path(c.node_dir) if c.node_dir is not None else Path(c.output_dir) / NODE_FOLDER
        self.storage = "lora" if c.lora_fake_score else "full"
        if self.storage == "full":
            self.node_network = copy.deepcopy(self.fake_network).requires_grad_(False).eval()
            node_den = Denoiser(self.node_network, self.teacher_denoiser.schedule, self.teacher_denoiser.prediction_type)
        else:
            from . import lora

            params = lora.add_lora(self.teacher_denoiser.model, NODE_ADAPTER, rank=c.lora_rank, alpha=c.lora_alpha,
                                   target_modules=c.lora_target_modules)
            for p in params:
                p.requires_grad_(False)
            node_den = self.teacher_denoiser
        self.__dict__["node_guided"] = GuidedDenoiser(node_den, guider=self.teacher.guider,
                                                      guidance_space=self.teacher.guidance_space)
        self.node: int | None = None  # current real-score node (None: stage 1)
        self.visited: list[int] = []  # stage-2 nodes in the order they became the real score
        # advance="plateau": the step the current node began, its best FID so far and the evaluations since
        self.node_start = -1
        self.best_fid = float("inf")
        self.stale = 0

    def train(self, mode: bool = True) -> "DisBack":
        super().train(mode)
        if self.storage == "full":
            self.node_network.eval()
        return self

    # ------------------------------------------------------------------ contract
    @property
    def stage(self) -> int:
        return 1 if self.node is None else 2

    @property
    def trains_generator(self) -> bool:
        """Stage 1 has no generator update: G_0 stays frozen while the path is recorded, and neither its
        optimiser nor the student's EMA counts those steps (stage 2 starts them as the base method would)."""
        return self.stage == 2

    def generator_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.stage == 1:
            raise RuntimeError("DisBack has no generator loss in stage 1 (the trainer skips the generator update).")
        out = super().generator_loss(batch)
        out.update(stage=torch.tensor(2.0), node=torch.tensor(float(self.node)))
        return out

    def critic_loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = super().critic_loss(batch)
        if self.stage == 1:
            out["stage"] = torch.tensor(1.0)
        return out

    @property
    def critic_trains_discriminator(self) -> bool:
        """Stage 1 trains the discriminator head only with ``record_discriminator``."""
        return self.config.record_discriminator if self.stage == 1 else super().critic_trains_discriminator

    def dsm_loss(self, x0: torch.Tensor, cond, uncond, g: torch.Generator) -> torch.Tensor:
        """Stage 1 (degradation recording): the base method's DSM on samples of the frozen initial student, with
        the null condition on ``label_dropout`` of the rows."""
        c = self.config
        if self.stage == 1 and c.label_dropout > 0 and uncond is not None:
            drop = torch.rand(x0.shape[0], generator=g, device=g.device) < c.label_dropout
            cond = _where_rows(drop, cond, uncond)
        return super().dsm_loss(x0, cond, uncond, g)

    def _teacher_x0(self, x_t, t, cond, uncond, scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.node:  # stage 1 (unused) or node 0: the teacher itself
            return super()._teacher_x0(x_t, t, cond, uncond, scale)
        with torch.no_grad(), self._node_adapter():
            if scale is not None:  # dm_step_guidance: the node under per-row CFG, as the teacher would be
                return cfg_x0(self.node_guided.denoiser, x_t, t, cond, uncond, scale)
            return self.node_guided(x_t, t, cond=cond, uncond=uncond).x0

    def _node_adapter(self):
        if self.storage == "full":
            return contextlib.nullcontext()
        from .lora import use_adapter
        return use_adapter(self.teacher_denoiser.model, NODE_ADAPTER)

    # ------------------------------------------------------------------ the node schedule
    def begin_generator_step(self, step: int) -> None:
        """Trainer hook: record node ``j`` at step ``j * record_interval`` (stage 1), switch the real score to
        :meth:`DisBackConfig.node_at` (stage 2; with ``advance="plateau"`` also to the next node once the
        current one has plateaued)."""
        c = self.config
        if 0 < step <= c.recording_steps and step % c.record_interval == 0:
            self.save_node(step // c.record_interval)
        if c.advance == "interval":
            node = c.node_at(step)
        elif step < c.recording_steps:
            node = None
        elif self.node is None:
            node = c.nodes - 1
        elif self.node > 0 and (self.stale >= c.plateau_patience or step - self.node_start >= c.interval):
            node = self.node - 1
        else:
            node = self.node
        if node is not None and node != self.node:
            self.set_node(node)
            self.node_start, self.best_fid, self.stale = step, float("inf"), 0

    def observe_evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Trainer hook after each evaluation: with ``advance="plateau"``, count the evaluations of the current
        node (1..N-1) whose FID is not below ``(1 - plateau_tolerance)`` times its best so far."""
        c = self.config
        if c.advance != "plateau" or not self.node:
            return
        if "fid" not in metrics:
            raise ValueError("advance 'plateau' needs the in-training FID, and this evaluation has none (the trainer "
                             "computes it for the builtin:digits teacher).")
        fid = float(metrics["fid"])
        if fid < (1.0 - c.plateau_tolerance) * self.best_fid:
            self.best_fid, self.stale = fid, 0
        else:
            self.stale += 1

    def set_node(self, node: int) -> None:
        """Make node ``node`` the real score (0: the teacher) and record the switch."""
        if node > 0:
            self.load_node(node)
        self.node = node
        if not self.visited or self.visited[-1] != node:
            self.visited.append(node)

    def node_path(self, node: int) -> Path:
        return self.node_dir / f"node-{node:03d}.safetensors"

    def _fake_state(self) -> dict[str, torch.Tensor]:
        if self.storage == "full":
            return {k: v.detach().float().cpu().contiguous() for k, v in self.fake_network.state_dict().items()}
        key = ".fake_score."
        return {k.replace(key, ".#."): v.detach().float().cpu().contiguous()
                for k, v in self.teacher_denoiser.model.state_dict().items() if "lora_" in k and key in k}

    def save_node(self, node: int) -> Path:
        """Write the fake score's current weights (full, or its LoRA deltas) as node ``node``, atomically."""
        from accelerate import PartialState
        from safetensors.torch import save_file

        path = self.node_path(node)
        state = PartialState()
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file(self._fake_state(), str(tmp), metadata={"node": str(node), "storage": self.storage})
            os.replace(tmp, path)
        state.wait_for_everyone()
        return path

    def load_node(self, node: int) -> None:
        """Load node ``node``'s weights into the real-score network (strictly: every key must match)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.node_path(node)
        if not path.is_file():
            raise CheckpointError(f"DisBack node file {str(path)!r} is missing (stage 1 writes nodes 1..{self.config.nodes} "
                                  f"into {str(self.node_dir)!r}).")
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read DisBack node file {str(path)!r}: {err}") from None
        if self.storage == "full":
            target = self.node_network
        else:
            target = self.teacher_denoiser.model
            weights = {k.replace(".#.", f".{NODE_ADAPTER}."): v for k, v in weights.items()}
            own = {k for k in target.state_dict() if f".{NODE_ADAPTER}." in k}
            if set(weights) != own:
                raise CheckpointError(f"DisBack node file {str(path)!r} does not fit the {NODE_ADAPTER!r} adapter.")
        try:
            target.load_state_dict(weights, strict=self.storage == "full")
        except RuntimeError as err:
            raise CheckpointError(f"DisBack node file {str(path)!r} does not fit the network: {err}") from None

    def real_score_parameters(self) -> list[torch.Tensor]:
        """The weights the generator's real score reads now (for checksums): the node's, or the teacher's."""
        net = self.teacher_denoiser.model
        if not self.node:
            return [p for n, p in net.named_parameters() if "lora_" not in n]
        if self.storage == "full":
            return list(self.node_network.parameters())
        return [p for n, p in net.named_parameters() if "lora_" not in n or f".{NODE_ADAPTER}." in n]

    # ------------------------------------------------------------------ trainer state
    def trainer_state(self) -> dict:
        return {**super().trainer_state(), "disback": {
            "node": -1 if self.node is None else int(self.node), "visited": torch.tensor(self.visited, dtype=torch.long),
            "node_start": int(self.node_start), "best_fid": float(self.best_fid), "stale": int(self.stale)}}

    def load_trainer_state(self, state: dict) -> None:
        state = dict(state)
        disback = state.pop("disback", None)
        super().load_trainer_state(state)
        if disback is None:
            return
        node = int(disback["node"])
        self.visited = [int(v) for v in torch.as_tensor(disback["visited"]).tolist()]
        self.node = None if node < 0 else node
        # checkpoints from before advance="plateau" have no counters: an interval run, which does not read them
        self.node_start = int(disback.get("node_start", -1))
        self.best_fid = float(disback.get("best_fid", float("inf")))
        self.stale = int(disback.get("stale", 0))
        if self.node:
            self.load_node(self.node)

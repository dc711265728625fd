"""S³ search: evolutionary search over USF solver schedules, screened by a learned performance predictor.

Liu, Ning, Yang, Wang, *A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic
Models* (ICLR 2024, arXiv:2312.07243). The released evolutionary search (parents by rank from the top
15, crossover 0.3, per-decision mutation 0.3, timestep noise sigma 0.08) is used as the proposal
distribution; the paper's predictor (an MLP on the encoded schedule) ranks many proposals and only the
most promising are evaluated with the model, in rounds of evaluate -> retrain -> propose.

The search space is USF's (:mod:`fastgen.solvers.usf`): the lambda-positions of the timesteps, and per
step the prediction type, Taylor order, start point, relaxation, corrector (none / pseudo / implicit,
an implicit one costing a step elsewhere at fixed NFE) and the analytical first step (none / zero_x0 /
average_x0 when a data mean is given).

The metric is whatever ``evaluate`` returns (lower is better); :mod:`fastgen.solvers.evaluate` offers
FID of a few hundred samples on fixed seeds (what the paper optimises, and what the benchmark reports)
and the RMS distance to a high-NFE reference from the same noise (no features needed; measures the ODE
error only). The final top candidates are re-scored on a larger, disjoint sample (search hygiene).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .usf import SolverSchedule, StepDecision, logsnr_uniform_timesteps

SEARCH_RELAXATIONS = ("none", "dpmsolver-2", "unipc-bh1", "linear")
ORDER_PROBS = {1: 0.25, 2: 0.45, 3: 0.30}


@dataclass
class SearchSpace:
    """What the search may choose, for one model and one NFE.

    Args:
        nfe: network evaluations per sample (guidance excluded).
        t_max, t_min: the model's network-time range (first timestep is fixed at ``t_max``).
        lambda_of, t_of_lambda: the model's ``lambda(t)`` and its inverse (a :class:`NoiseSchedule`).
        teleport_steps: 1 when a Gaussian teleport replaces the first step (its target is searched);
            the analytical first step and implicit correctors are then not used.
        data_mean: the data mean in model space (a nested list) for the ``average_x0`` first step;
            ``None`` leaves that option out.
    """

    nfe: int
    t_max: float
    t_min: float
    lambda_of: Callable
    t_of_lambda: Callable
    teleport_steps: int = 0
    data_mean: Any = None

    def afs_options(self) -> tuple[str, ...]:
        if self.teleport_steps:
            return ("none",)
        return ("none", "zero_x0") + (("average_x0",) if self.data_mean is not None else ())

    def lam_range(self) -> tuple[float, float]:
        return float(self.lambda_of(self.t_max)), float(self.lambda_of(self.t_min))

    def to_u(self, t: float) -> float:
        lo, hi = self.lam_range()
        return (float(self.lambda_of(t)) - lo) / (hi - lo)

    def from_u(self, u: float) -> float:
        lo, hi = self.lam_range()
        return float(self.t_of_lambda(lo + u * (hi - lo)))


# ---------------------------------------------------------------------------------------------- encoding
def encode(schedule: SolverSchedule, max_steps: int) -> list[float]:
    """Fixed-length feature vector of a schedule (per step: position in lambda, prediction, order,
    relaxation, corrector), the predictor's input."""
    feats: list[float] = [float(schedule.afs == "zero_x0"), float(schedule.afs == "average_x0"),
                          float(schedule.final_timestep is None), schedule.num_steps / max_steps]
    lam = [float(x) for x in schedule.meta.get("u", [0.0] * schedule.num_steps)]
    for i in range(max_steps):
        if i < schedule.num_steps:
            s = schedule.steps[i]
            feats += [1.0, lam[i], float(s.prediction == "data"), s.order / 3.0,
                      *[float(s.relaxation == r) for r in SEARCH_RELAXATIONS], s.relaxation_coef,
                      float(s.corrector == "pseudo"), float(s.corrector == "implicit"),
                      float(s.corrector_relaxation != "none"), -1.0 - s.start_point]
        else:
            feats += [0.0] * 13
    return feats


class Predictor:
    """The S³ performance predictor: a small MLP from encoded schedules to log(metric)."""

    def __init__(self, dim: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        g.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        # Built on the meta device and initialised from the local generator as nn.Linear initialises itself
        # (same draws, same order), so the caller's global torch RNG is neither reseeded nor advanced.
        layers = [torch.nn.Linear(dim, 64, device="meta"), torch.nn.SiLU(), torch.nn.Linear(64, 64, device="meta"),
                  torch.nn.SiLU(), torch.nn.Linear(64, 1, device="meta")]
        self.net = torch.nn.Sequential(*layers).to_empty(device="cpu")
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=g)
                bound = 1 / math.sqrt(layer.in_features)
                torch.nn.init.uniform_(layer.bias, -bound, bound, generator=g)
        self.trained = False

    def fit(self, x: list[list[float]], y: list[float], iters: int = 150) -> None:
        xt = torch.tensor(x, dtype=torch.float32)
        yt = torch.log(torch.tensor(y, dtype=torch.float32).clamp(min=1e-8))
        self.mu, self.sd = yt.mean(), yt.std().clamp(min=1e-6)
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(iters):
            pred = self.net(xt).squeeze(-1)
            # MSE plus a pairwise ranking term: the search needs the order more than the values.
            target = (yt - self.mu) / self.sd
            diff_p = pred[:, None] - pred[None, :]
            diff_t = target[:, None] - target[None, :]
            rank = torch.nn.functional.softplus(-diff_p * torch.sign(diff_t)).mean()
            loss = ((pred - target) ** 2).mean() + rank
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.trained = True

    @torch.no_grad()
    def predict(self, x: list[list[float]]) -> list[float]:
        return self.net(torch.tensor(x, dtype=torch.float32)).squeeze(-1).tolist()


# ---------------------------------------------------------------------------------------------- candidates
def make_schedule(space: SearchSpace, u: list[float], steps: list[StepDecision], afs: str,
                  final_zero: bool) -> SolverSchedule:
    """A schedule from lambda-positions ``u`` (0 = t_max ... 1 = t_min) of its timesteps."""
    times = [space.from_u(x) for x in u]
    times[0] = space.t_max
    for i in range(1, len(times)):  # keep strictly decreasing after rounding to the network's range
        times[i] = min(times[i], times[i - 1] - 1e-3)
    final = None if final_zero else max(space.t_min, 0.0)
    if final is not None and final >= times[-1]:
        final = None
    return SolverSchedule([round(t, 4) for t in times], steps, final_timestep=final, afs=afs,
                          afs_x0=space.data_mean if afs == "average_x0" else None,
                          meta={"u": [round(x, 6) for x in u], "teleport_steps": space.teleport_steps})


def _implicit_steps(steps: list[StepDecision], afs: str = "none") -> list[int]:
    """Steps whose implicit corrector costs an evaluation (not the final step, nor an analytical first step)."""
    first = int(afs != "none")
    return [i for i in range(first, len(steps) - 1) if steps[i].corrector == "implicit" and steps[i].prediction != "ddim"]


def _fit_nfe(space: SearchSpace, u: list[float], steps: list[StepDecision], afs: str,
             rng: random.Random) -> tuple[list[float], list[StepDecision]]:
    """Change the step count until the schedule costs exactly ``space.nfe`` (an implicit corrector costs
    one evaluation): too expensive -> drop an implicit corrector (to pseudo) or a random interior step;
    too cheap -> split the widest lambda gap (the new step copies its neighbour, without implicit)."""
    def cost() -> int:
        return len(steps) - (afs != "none") - space.teleport_steps + len(_implicit_steps(steps, afs))

    for _round in range(2):
        for _ in range(4 * space.nfe + 8):
            if cost() == space.nfe:
                return u, steps
            implicit = _implicit_steps(steps, afs)
            if cost() > space.nfe:
                if implicit and (len(steps) <= 2 or rng.random() < 0.5):
                    steps[rng.choice(implicit)].corrector = "pseudo"
                elif len(steps) > 2:
                    j = rng.randrange(1, len(steps))
                    u.pop(j)
                    steps.pop(j)
            else:
                _, i = max((b - a, i) for i, (a, b) in enumerate(zip(u, u[1:] + [1.0])))
                hi = u[i + 1] if i + 1 < len(u) else min(1.0, u[i] + 2 * (1.0 - u[i]) / 3)
                u.insert(i + 1, (u[i] + hi) / 2)
                new = StepDecision(**vars(steps[i]))
                new.corrector = "pseudo" if new.corrector == "implicit" else new.corrector
                steps.insert(i + 1, new)
        for s in steps:  # fallback: without implicit correctors every add/remove changes the cost by one
            s.corrector = "pseudo" if s.corrector == "implicit" else s.corrector
    raise RuntimeError(f"could not fit a schedule to nfe={space.nfe}")  # unreachable: the fallback converges


def seed_candidates(space: SearchSpace) -> list[SolverSchedule]:
    """Hand-made starting points: DDIM and the diffusers-style multistep solvers on logSNR-uniform and
    time-uniform grids; UniPC-style schedules with each analytical first step."""
    out = []
    for afs in space.afs_options():
        n = space.nfe + space.teleport_steps + (afs != "none")
        grids = {"logsnr": [i / n for i in range(n)],
                 "time": [space.to_u(space.t_max - i * (space.t_max - space.t_min) / n) for i in range(n)]}
        for grid, u in grids.items():
            for kind in ("dpm++", "unipc", "unipc3", "deis", "ddim"):
                if afs != "none" and (grid != "logsnr" or kind not in ("unipc", "unipc3")):
                    continue
                steps = []
                for i in range(n):
                    k = min(2 if kind in ("dpm++", "unipc", "deis") else 3, i + 1, n - i)
                    if kind == "ddim":
                        steps.append(StepDecision("data", 1))
                    elif kind == "deis":
                        steps.append(StepDecision("noise", k))
                    elif kind == "dpm++":
                        steps.append(StepDecision("data", k, "dpmsolver-2" if k == 2 else "none"))
                    else:
                        steps.append(StepDecision("data", k, "unipc-bh2" if k == 2 else "none", corrector="pseudo",
                                                  corrector_relaxation="unipc-bh2"))
                out.append(make_schedule(space, u, steps, afs, True))
    return out


def mutate(space: SearchSpace, parent: SolverSchedule, rng: random.Random, p: float = 0.3) -> SolverSchedule:
    """S³'s mutation: each decision changes with probability ``p``; timesteps get N(0, 0.08) in lambda;
    the analytical first step and the final target change with probability 0.1; the step count follows
    from the NFE (implicit correctors cost a step)."""
    u = list(parent.meta["u"])
    steps = [StepDecision(**vars(s)) for s in parent.steps]
    afs = parent.afs
    options = space.afs_options()
    if len(options) > 1 and rng.random() < 0.1:
        afs = rng.choice([a for a in options if a != afs])
    u = [0.0] + sorted(min(max(x + (rng.gauss(0, 0.08) if rng.random() < p else 0.0), 1e-3), 0.995) for x in u[1:])
    for s in steps:
        if rng.random() < p:
            s.prediction = rng.choice(["data", "noise"])
        if rng.random() < p:
            s.order = rng.choices(list(ORDER_PROBS), weights=list(ORDER_PROBS.values()))[0]
        if rng.random() < p:
            s.relaxation = rng.choice(SEARCH_RELAXATIONS)
            s.relaxation_coef = round(rng.uniform(-0.5, 0.5), 3) if s.relaxation == "linear" else 0.0
        if rng.random() < p:
            s.corrector = rng.choice(["none", "pseudo"] + (["implicit"] if not space.teleport_steps else []))
        if rng.random() < p:
            s.corrector_relaxation = rng.choice(["none", "unipc-bh1", "unipc-bh2"])
        if rng.random() < p / 2:
            s.start_point = rng.choices([-1, -2, -3], weights=[0.6, 0.3, 0.1])[0]
        if s.prediction == "ddim":
            s.prediction = "data"
    u, steps = _fit_nfe(space, u, steps, afs, rng)
    for i in range(1, len(u)):
        u[i] = max(u[i], u[i - 1] + 1e-3)
    final_zero = parent.final_timestep is None
    if rng.random() < 0.1:
        final_zero = not final_zero
    return make_schedule(space, u, steps, afs, final_zero)


def crossover(space: SearchSpace, a: SolverSchedule, b: SolverSchedule, rng: random.Random) -> SolverSchedule:
    """Uniform crossover of per-step decisions and timesteps (same step count only)."""
    if a.num_steps != b.num_steps or a.afs != b.afs:
        return mutate(space, a, rng)
    pick = [rng.random() < 0.5 for _ in range(a.num_steps)]
    u = sorted((x if k else y) for k, x, y in zip(pick, a.meta["u"], b.meta["u"]))
    u[0] = 0.0
    steps = [StepDecision(**vars(x if k else y)) for k, x, y in zip(pick, a.steps, b.steps)]
    u, steps = _fit_nfe(space, u, steps, a.afs, rng)
    for i in range(1, len(u)):
        u[i] = max(u[i], u[i - 1] + 1e-3)
    final_from = a if rng.random() < 0.5 else b  # the final target is inherited from either parent, 1/2 each
    return make_schedule(space, u, steps, a.afs, final_from.final_timestep is None)


def key(schedule: SolverSchedule) -> str:
    d = schedule.to_dict()
    d.pop("meta", None)
    d.pop("name", None)
    return json.dumps(d, sort_keys=True)


# ---------------------------------------------------------------------------------------------- search
def read_state(state_path: str | os.PathLike, options: dict) -> list[dict[str, Any]]:
    """The records of the search state file ``state_path`` ([] when absent), after checking that it was
    started with ``options`` (the space's ``nfe``/``teleport_steps`` and the caller's options, compared
    as JSON). A state from other options, or a file that is not a search state, is a ValueError naming
    the file; the file is not touched. Cheap: callers check before loading a model."""
    state_path = Path(state_path)
    if not state_path.exists():
        return []
    try:
        state = json.loads(state_path.read_text())
        records = state["records"]
        stored = {**state.get("space", {}), **state.get("options", {})}
        if not isinstance(records, list):
            raise TypeError(f"records is a {type(records).__name__}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"search state file {str(state_path)!r} is not a readable search state "
                         f"({type(err).__name__}: {' '.join(str(err).split())}); delete it to start afresh.") from None
    wanted = json.loads(json.dumps(options))
    if "options" not in state:  # written before the options were stored: only the space can be checked
        wanted = {k: v for k, v in wanted.items() if k in state.get("space", {})}
    differ = [f"{k}={stored.get(k)!r} there, {wanted[k]!r} now" for k in sorted(wanted) if stored.get(k) != wanted[k]]
    if differ:
        raise ValueError(f"search state file {str(state_path)!r} was started with other options ({'; '.join(differ)}); "
                         "resume with the same options, or choose another out / delete the state to start afresh.")
    return records


def search(space: SearchSpace, evaluate: Callable[[SolverSchedule], float], *, budget: int, state_path: str | os.PathLike,
           log_path: str | os.PathLike, seed: int = 0, per_round: int = 4, proposals: int = 96,
           progress: Callable | None = None, initial: list[SolverSchedule] = (),
           options: dict | None = None) -> list[dict[str, Any]]:
    """Run S³ until ``budget`` true evaluations are in the state file; resumable (state is re-read).
    ``initial`` schedules (e.g. an earlier search's best) are evaluated with the seed candidates.
    ``options`` (JSON values: the caller's settings that change the records, e.g. model, metric, seed) are
    stored in the state with the space's NFE; resuming with different ones is refused (:func:`read_state`).

    Returns the evaluated records ``{"schedule", "metric", "round", "seconds"}``, best first.
    """
    state_path, log_path = Path(state_path), Path(log_path)
    space_options = {"nfe": space.nfe, "teleport_steps": space.teleport_steps}
    records = read_state(state_path, {**space_options, **dict(options or {})})
    seen = {key(SolverSchedule.from_dict(r["schedule"])) for r in records}
    max_steps = space.nfe + space.teleport_steps + 1
    initial = [SolverSchedule.from_dict(c.to_dict()) for c in initial]
    for c in initial:
        if c.nfe != space.nfe:
            raise ValueError(f"initial schedules must have nfe={space.nfe}, got one with nfe={c.nfe}.")
        if "u" not in c.meta:
            c.meta["u"] = [round(space.to_u(t), 6) for t in c.timesteps]
    bar = progress(total=budget, initial=min(len(records), budget)) if progress else None

    def run(cands: list[SolverSchedule], rnd: int) -> None:
        for c in cands:
            if len(records) >= budget:
                return
            k = key(c)
            if k in seen:
                continue
            seen.add(k)
            t0 = time.time()
            try:
                metric = float(evaluate(c))
            except (ValueError, RuntimeError) as err:  # an unstable schedule: record it as a failure
                metric = float("inf")
                c.meta["error"] = str(err)[:200]
            if not math.isfinite(metric):
                metric = 1e6
            rec = {"schedule": c.to_dict(), "metric": metric, "round": rnd, "seconds": round(time.time() - t0, 3)}
            records.append(rec)
            with log_path.open("a") as f:
                f.write(json.dumps({"round": rnd, "metric": metric, "nfe": c.nfe, "seconds": rec["seconds"],
                                    "schedule": rec["schedule"]}) + "\n")
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"space": space_options, "options": dict(options or {}),
                                       "records": records}))
            os.replace(tmp, state_path)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(best=f"{min(r['metric'] for r in records):.4g}")

    run(seed_candidates(space) + initial, 0)  # already-evaluated seeds are skipped, new ones run on resume
    # Resume = the uninterrupted run: each round's proposals depend only on the seed, the round number and
    # the records of earlier rounds, so the last recorded round (perhaps cut short by a kill) is proposed
    # again identically and its missing candidates are evaluated.
    rnd = max((r["round"] for r in records), default=0) - 1
    rnd = max(rnd, 0)
    while len(records) < budget:
        rnd += 1
        rng = random.Random(seed * 1000003 + rnd)
        earlier = [r for r in records if r["round"] < rnd]
        seen_before = {key(SolverSchedule.from_dict(r["schedule"])) for r in earlier}
        ranked = sorted(earlier, key=lambda r: r["metric"])
        parents = [SolverSchedule.from_dict(r["schedule"]) for r in ranked[:15]]
        weights = [1.0 / (i + 1) for i in range(len(parents))]
        pool = []
        for _ in range(proposals):
            a = rng.choices(parents, weights=weights)[0]
            if rng.random() < 0.3 and len(parents) > 1:
                pool.append(crossover(space, a, rng.choices(parents, weights=weights)[0], rng))
            else:
                pool.append(mutate(space, a, rng))
        pool = [c for c in pool if key(c) not in seen_before]
        if len(earlier) >= 12 and pool:
            pred = Predictor(len(encode(pool[0], max_steps)), seed=rnd)
            pred.fit([encode(SolverSchedule.from_dict(r["schedule"]), max_steps) for r in earlier],
                     [r["metric"] for r in earlier])
            scores = pred.predict([encode(c, max_steps) for c in pool])
            pool = [c for _, c in sorted(zip(scores, pool), key=lambda z: z[0])]
            # exploit the predictor's best, keep one random proposal for exploration
            chosen = pool[: per_round - 1] + ([rng.choice(pool[per_round - 1:])] if len(pool) >= per_round else [])
        else:
            chosen = pool[:per_round]
        if not chosen:
            continue
        run(chosen, rnd)
    if bar is not None:
        bar.close()
    return sorted(records, key=lambda r: r["metric"])


__all__ = ["SearchSpace", "Predictor", "search", "read_state", "encode", "mutate", "crossover", "seed_candidates",
           "make_schedule", "logsnr_uniform_timesteps"]

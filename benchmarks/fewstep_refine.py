"""What a few-step student's later steps should learn: a one-step student refined by the teacher itself.

Runs a distilled student's first step, then the *teacher* for every later step (DDIM re-noise with the previous
step's own noise estimate, or fresh noise), with the teacher guided at CFG scale ``w`` (``w = 1``: unguided).
If a teacher refinement at some ``(t, w)`` beats the student alone, a trained few-step student can too when its
later steps learn that target; if none does, extra student steps have nothing to learn from the teacher.
Each configuration is scored on the disjoint seed sets of ``benchmarks/fid_noise.py`` (same seeds, same
labels), so the ``student alone`` row equals ``fid_noise.py --model`` on the same folder.

    python benchmarks/fewstep_refine.py --model runs/one-step/student \\
        --configs 500 500,20 500,100 500,100@2 500,100,50,25 --out benchmarks/results/fewstep_refine.json

A configuration is ``t0,t1,...[@w][:fresh]``: ``t0`` is the student's step, the rest the teacher's.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import randn_tensor

from fastgen.benchmarking import Results, builtin_pipeline, parse_options, portable, pyplot
from fastgen.denoiser import Denoiser
from fastgen.metrics import evaluate_pipeline
from fastgen.pipelines import FastGenPipelineOutput
from fastgen.training.dmd2 import cfg_x0
from fastgen.training.students import (Student, check_renoise, check_student_timesteps, null_class_label,
                                        split_conditions)

FIRST_SEED = 100_000  # benchmarks/fid_noise.py's seed sets


@dataclass
class FewStepRefine:
    """A one-step student refined by the teacher: FID on disjoint seed sets per (steps, teacher CFG)."""

    model: str = field(default="builtin:digits-1step", metadata={"help": "the student (pipeline folder or builtin:NAME)"})
    configs: list[str] = field(default_factory=lambda: ["500", "500,100", "500,100@2"], metadata={
        "help": "t0,t1,...[@w][:fresh]: student at t0, teacher at t1... with CFG w (default 1: unguided), "
                "DDIM re-noise unless :fresh"})
    samples: int = 2000
    sets: int = 4
    batch_size: int = 500
    label: str = field(default="", metadata={"help": "what the record calls --model (default: its folder)"})
    out: str = "benchmarks/results/fewstep_refine.json"


def parse_config(text: str) -> tuple[list[int], float, str]:
    """``"500,100@2:fresh"`` -> ``([500, 100], 2.0, "fresh")``; a clear error naming ``--configs`` otherwise."""
    body, _, renoise = text.partition(":")
    steps, _, scale = body.partition("@")
    try:
        ts = [int(t) for t in steps.split(",")]
        w = float(scale) if scale else 1.0
        renoise = check_renoise(renoise or "ddim")
        ts = check_student_timesteps(ts)
    except ValueError as err:
        raise SystemExit(f"--configs: {text!r} is not t0,t1,...[@w][:fresh|ddim] ({err}).") from None
    if not w >= 0:
        raise SystemExit(f"--configs: {text!r}: the CFG scale must be >= 0.")
    return ts, w, renoise


class TeacherRefined:
    """A pipeline-like callable: the student's step at ``timesteps[0]``, the teacher's (CFG ``scale``) after it."""

    def __init__(self, student_pipe, teacher_unet, timesteps, scale: float, renoise: str):
        self.pipe, self.scale, self.num_classes = student_pipe, scale, student_pipe.num_classes
        net = student_pipe.network
        den = Denoiser.from_scheduler(net, student_pipe.scheduler)
        self.chain = Student(net, den.schedule, den.prediction_type, timesteps, renoise=renoise)
        self.teacher = Denoiser.from_scheduler(teacher_unet, student_pipe.scheduler)
        self.null = null_class_label(teacher_unet)

    def _teacher_x0(self, x, step, labels):
        t = torch.full((x.shape[0],), self.chain.timesteps[step], dtype=torch.long)
        cond, uncond = split_conditions(labels, self.null)
        return cfg_x0(self.teacher, x, t, cond, uncond, torch.full((x.shape[0],), self.scale))

    @torch.no_grad()
    def __call__(self, class_labels, seed, output_type="pt", **_):
        labels = self.pipe._class_label_tensor(class_labels)
        generator = self.pipe._generators_from_seed(seed, None, len(labels))
        net = self.pipe.network
        size = net.config.sample_size
        x = randn_tensor((len(labels), net.config.in_channels, size, size), generator=generator, dtype=net.dtype)
        cond = {"class_labels": labels}
        x0 = self.chain.denoise(x, 0, cond)  # the student's own step, exactly as its pipeline runs it
        for step in range(1, self.chain.num_steps):
            x = self.chain.renoise(x, x0, step, generator)
            x0 = self._teacher_x0(x, step, labels)
        return FastGenPipelineOutput(images=self.pipe._decode(x0, output_type), nfe=None)


def draw(data: dict, png) -> None:
    """FID (mean and std over the seed sets) per configuration, the student alone first."""
    plt = pyplot()
    rows = list(data.get("summary", {}).items())
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows) + 2), 4))
    means = [v["mean"] for _, v in rows]
    ax.bar(range(len(rows)), means, yerr=[v["std"] or 0 for _, v in rows], capsize=3,
           color=["tab:gray" if "," not in k else "tab:blue" for k, _ in rows])
    if rows and "," not in rows[0][0]:
        ax.axhline(means[0], color="tab:gray", lw=0.8, ls="--", label="student alone")
        ax.legend()
    ax.set_xticks(range(len(rows)), [k for k, _ in rows], rotation=45, ha="right")
    ax.set_ylabel("digits FID (2,000 samples, mean of seed sets)")
    ax.set_title(f"{data['config']['model']}\nstudent at t0, then the teacher: t0,t1,...@CFG", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    opts = parse_options(FewStepRefine, argv)
    configs = {c: parse_config(c) for c in opts.configs}  # every config checked before a model loads
    student = builtin_pipeline(opts.model, threads=1)
    teacher = builtin_pipeline("digits", threads=1).unet
    name = opts.label or (opts.model if opts.model.startswith("builtin:") else portable(opts.model))
    config = {"model": name, "samples": opts.samples, "seeds": f"set k: {FIRST_SEED} + k * samples ...",
              "hardware": "CPU, x86-64, 1 torch thread"}
    results = Results(opts.out, config, resume_on=("model", "samples"))

    def measure(cell) -> dict:
        text, k = cell
        ts, w, renoise = configs[text]
        pipe = TeacherRefined(student, teacher, ts, w, renoise)
        res = evaluate_pipeline(pipe, opts.samples, seed=FIRST_SEED + k * opts.samples, batch_size=opts.batch_size,
                                knn_metrics=False, progress=False)
        return {"student_step": ts[0], "teacher_steps": ts[1:], "teacher_cfg": w, "renoise": renoise,
                "fid": res.fid, "roughness": res.roughness, "accuracy": res.accuracy}

    def summary(data: dict) -> None:
        rows = {}
        for c in data["cells"]:
            rows.setdefault(c["config"], []).append(c["fid"])
        data["summary"] = {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                               "sets": len(v)} for k, v in rows.items()}

    cells = [(c, k) for c in opts.configs for k in range(opts.sets)]
    results.run(cells, key=lambda cell: {"config": cell[0], "set": cell[1]}, measure=measure, after=summary)
    results.plot(draw)
    for k, v in results.data.get("summary", {}).items():
        print(f"{k:>24}: FID {v['mean']:.3f} +- {v['std'] or 0:.3f} ({v['sets']} sets)")


if __name__ == "__main__":
    main()

"""Peak memory of a DMD2 training step: full fake-score copy vs LoRA fake score (and LoRA student) on one base.

Each configuration runs in a fresh subprocess, so the operating system's peak resident set size
(``ru_maxrss``) belongs to that configuration alone. The network is an SD-1.5-shaped
``UNet2DConditionModel`` at reduced width (random weights; no download), the step is the trainer's: one
critic update and one generator update with AdamW on every trainable group. Besides the measured peak, the
record gives the analytic bytes of what training keeps resident: fp32 weights of every network plus, for
trainable parameters, gradients and AdamW's two moments.

    python benchmarks/distill_memory.py                 # CPU; on a GPU machine add --device cuda
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastgen.benchmarking import parse_options, portable, pyplot, write_json

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {
    "full copies (student + fake score)": dict(),
    "LoRA fake score": dict(lora_fake_score=True),
    "LoRA student + LoRA fake score": dict(lora_student=True, lora_fake_score=True),
}


@dataclass
class MemoryBenchmark:
    """Peak memory of one DMD2 step with full copies vs LoRA adapters on the one frozen teacher."""

    width: int = field(default=64, metadata={"help": "first block width of the SD-shaped UNet (SD 1.5: 320)"})
    resolution: int = field(default=32, metadata={"help": "latent side"})
    batch: int = field(default=2, metadata={"help": "batch size of the step"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (cuda: torch.cuda.max_memory_allocated)"})
    out: str = field(default=str(RESULTS / "distill_memory.json"), metadata={"help": "results JSON (PNG beside it)"})


def _child(options: dict) -> dict:
    """One configuration, in this (fresh) process: build, one critic + one generator update, measure."""
    import resource

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fastgen.denoiser import Denoiser
    from fastgen.guidance import CFG
    from fastgen.training.dmd2 import DMD2
    from fastgen.training.method import Batch

    torch.set_num_threads(1)
    device = torch.device(options["device"])
    w = options["width"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(w, 2 * w, 4 * w, 4 * w), layers_per_block=2, sample_size=options["resolution"],
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32).to(device)
    teacher = Denoiser.from_scheduler(unet, DDPMScheduler())
    teacher_params = sum(p.numel() for p in unet.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_teacher = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = DMD2(teacher, guider=CFG(2.0), lora_rank=options["lora_rank"], gan_weight_generator=1e-3,
                  **options["mode"]).to(device)
    groups = method.optimizer_groups()
    optims = {k: torch.optim.AdamW(v, lr=1e-5) for k, v in groups.items()}

    def batch(seed):
        g = torch.Generator(device).manual_seed(seed)
        b, r = options["batch"], options["resolution"]
        text = {"encoder_hidden_states": torch.randn(b, 8, 128, generator=g, device=device)}
        return Batch(labels={"cond": text, "uncond": {"encoder_hidden_states": torch.zeros_like(
            text["encoder_hidden_states"])}}, noise=torch.randn(b, 4, r, r, generator=g, device=device),
            real=torch.randn(b, 4, r, r, generator=g, device=device), generator=g)

    for step, (phase, names) in enumerate([("critic", ["critic", "discriminator"]), ("generator", ["generator"])]):
        out = method(phase, batch(step))
        out["loss"].backward()
        for name in names:
            optims[name].step()
            optims[name].zero_grad(set_to_none=False)  # keep gradients resident, as between accumulation steps
    trainable = sum(p.numel() for ps in groups.values() for p in ps)
    seen = {id(p): p.numel() for p in method.parameters()}
    seen.update({id(p): p.numel() for p in unet.parameters()})  # the teacher, once (LoRA: the shared base)
    weights = sum(seen.values())
    record = {"trainable_params": trainable, "all_params": weights,
              "analytic_mib": (4 * weights + 12 * trainable) / 2**20, "teacher_params": teacher_params}
    if device.type == "cuda":
        record["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        record["peak_mib"] = kib / 1024
        record["peak_above_teacher_mib"] = (kib - rss_teacher) / 1024
    return record


def main(argv=None) -> dict:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
        return {}
    cfg = parse_options(MemoryBenchmark, argv)
    rows = []
    for label, mode in MODES.items():
        options = {**asdict(cfg), "mode": mode}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(options)], capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        rows.append({"mode": label, **json.loads(proc.stdout.strip().splitlines()[-1])})
        print(f"{label:36s} peak {rows[-1]['peak_mib']:8.1f} MiB  trainable {rows[-1]['trainable_params']:,}")
    full = rows[0]
    for row in rows:
        row["peak_ratio_vs_full"] = row["peak_mib"] / full["peak_mib"]
        if "peak_above_teacher_mib" in row:
            row["above_teacher_ratio_vs_full"] = row["peak_above_teacher_mib"] / full["peak_above_teacher_mib"]
    hardware = (f"{platform.machine()} CPU, peak resident set size of a fresh process" if cfg.device == "cpu"
                else "GPU, torch.cuda.max_memory_allocated")
    result = {"config": {**asdict(cfg), "out": portable(cfg.out)}, "hardware": hardware, "rows": rows}
    write_json(cfg.out, result)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 3))
        key = "peak_above_teacher_mib" if "peak_above_teacher_mib" in full else "peak_mib"
        ax.barh([r["mode"] for r in rows], [r[key] for r in rows], color=["#888", "#3a7", "#37a"])
        for i, r in enumerate(rows):
            ax.text(r[key], i, f" {r[key]:.0f} MiB", va="center")
        ax.set_xlabel("peak memory above the loaded teacher (MiB)" if key != "peak_mib" else "peak memory (MiB)")
        ax.set_title(f"DMD2 step, SD-shaped UNet width {cfg.width} ({full['teacher_params'] / 1e6:.0f}M params)")
        fig.tight_layout()
        fig.savefig(Path(cfg.out).with_suffix(".png"), dpi=110)
    return result


if __name__ == "__main__":
    main()

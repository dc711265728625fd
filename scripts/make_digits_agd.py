"""Build the built-in guidance adapter ``builtin:digits-agd`` (AGD for the built-in digits model).

Adapter guidance distillation (Jensen & Sadat, arXiv:2503.07274): a small adapter on the frozen digits
model, trained on the model's own CFG trajectories, so that one network evaluation per step reproduces
classifier-free guidance at any scale in [1, 8]. The adapter is trained (and measured against CFG on fixed
seeds) by ``benchmarks/agd.py``; this script copies the trained adapter into the package, and writes the
model card (training recipe, CPU minutes, the benchmark's figures beside CFG's) and a sample grid (CFG and
the adapter on the same seeds)::

    python benchmarks/agd.py --work runs/agd            # collects, trains, measures -> benchmarks/results/agd.json
    python scripts/make_digits_agd.py --run runs/agd/run-trajectories --overwrite
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from fastgen.benchmarking import replace_folder

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "fastgen" / "assets" / "digits-agd"
BENCH = ROOT / "benchmarks" / "results" / "agd.json"
RECIPE = ROOT / "distill" / "digits-agd.yaml"
GRID_SCALES = (3.0, 8.0)


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def card(bench: dict, adapter_config: dict, params: int, share: float) -> str:
    cfg, training = bench["config"], bench["training"]["trajectories"]
    cells = bench["cells"]
    main = sorted((c for c in cells if c["variant"] == "20 steps"), key=lambda c: (c["guidance_scale"], c["method"]))
    names = {"cfg": "CFG (base, 2 passes)", "agd": "AGD (this adapter)",
             "forward_noised": "adapter trained on forward-noised data", "none": "no guidance (base, 1 pass)"}
    fit = training.get("fit") or {}
    fit_text = (f" On 1,024 stored rows the adapter leaves {100 * fit['share_of_cfg_correction_left']:.0f}% of the "
                f"CFG correction's squared error unexplained (MSE {fit['mse_adapter_on']:.4f} against "
                f"{fit['mse_adapter_off']:.4f} with the adapter off)." if fit else "")
    rows = [f"| {c['guidance_scale']:g} | {names[c['method']]} | {c['nfe']:g} | {_fmt(c['fid'])} | "
            f"{_fmt(100 * c['accuracy'])}% | {_fmt(c['precision'], '.3f')} | {_fmt(c['recall'], '.3f')} | "
            f"{_fmt(c['rms_to_reference'], '.3f')} |" for c in main]
    extra = [c for c in cells if c["variant"] != "20 steps"]
    extra_rows = [f"| {c['variant']} | {c['guidance_scale']:g} | {names[c['method']]} | {c['nfe']:g} | "
                  f"{_fmt(c['fid'])} | {_fmt(100 * c['accuracy'])}% | {_fmt(c['rms_to_reference'], '.3f')} |"
                  for c in extra]
    wall = [f"| {r['batch']} | {r['config']} | {r['nfe']:g} | {1e3 * r['seconds_per_image']:.2f} | "
            f"{r['time_ratio_vs_cfg']:.2f} |" for r in bench.get("wall_time") or []]
    wall_text = ("| batch | configuration | NFE | ms / image | time vs CFG |\n|---|---|---|---|---|\n" + "\n".join(wall)
                 if wall else "Not measured.")
    extra_text = ("| composition | omega | model | NFE | FID | accuracy | RMS to CFG (20 steps) |\n"
                  "|---|---|---|---|---|---|---|\n" + "\n".join(extra_rows)) if extra_rows else "Not measured."
    recipe = RECIPE.read_text().strip()
    none = next((c for c in cells if c["method"] == "none"), None)
    gap = ""
    if none and none.get("rms_to_cfg_images"):
        pairs = sorted((float(k), v) for k, v in none["rms_to_cfg_images"].items())
        gap = ("\n\nRead FID with the RMS column: the unguided model's images are "
               + ", ".join(f"{v:.3f}" for _, v in pairs) + " from CFG's at omega "
               + ", ".join(f"{w:g}" for w, _ in pairs) + ", so the adapter's images sit at roughly half to two "
               "thirds of that distance: at the same accuracy it guides somewhat less than CFG, which is part of "
               "why its FID is lower (and its recall higher).")
    kind = ("one offset per channel and block" if adapter_config["variant"] == "additive"
            else "the block's pixels attend to the omega and time/class tokens")
    return f"""# digits-agd: a guidance adapter for the built-in digits model (AGD)

Classifier-free guidance at one network evaluation per step. Adapter guidance distillation (Jensen & Sadat,
*Efficient Distillation of Classifier-Free Guidance using Adapters*, arXiv:2503.07274) keeps the built-in
`digits` model frozen and adds small residual adapters on its self-attention blocks, conditioned on the
guidance scale omega (random Fourier features, stored with the weights) and on the base's own time and class
embedding. Trained on the model's own CFG sampling trajectories, one pass with the adapter at omega stands in
for the two passes of CFG at omega. A zero adapter is the base exactly; at guidance scale 1 the pipeline
switches the adapter off (CFG at 1 is the conditional model).

- variant `{adapter_config['variant']}` ({kind}), width {adapter_config['width']},
  on {len(adapter_config['layers'])} attention blocks: {params:,} parameters, {100 * share:.2f}% of the base's;
- trained for omega in [1, {cfg['omega_max']:g}] (trajectories draw omega uniformly, once each).

![CFG and AGD on the same seeds](samples_grid.png)

## Use

```python
import fastgen
from fastgen.guidance import CFG

pipe = fastgen.load_builtin("digits")
pipe.load_guidance_adapter("builtin:digits-agd")
out = pipe(class_labels=[0, 1, 2, 3], guidance_scale=5.0, seed=0)      # out.nfe == 20 (CFG: 40)
late = pipe(class_labels=[0, 1, 2, 3], guidance=CFG(guidance_scale=5.0, stop=0.7), guidance_scale=5.0)
pipe.unload_guidance_adapter()                                         # CFG again, two passes per step
```

The adapter folder is a diffusers `ModelMixin` (`config.json` + `diffusion_pytorch_model.safetensors`):
`fastgen.adapters.GuidanceAdapter.from_pretrained(<this folder>)`, then `.attach(unet)` and
`.set_guidance_scale(w)` to use it on the stock diffusers `UNet2DModel` in any sampling loop with CFG off.

## Figures

From `benchmarks/results/agd.json` (`benchmarks/agd.py`): {cfg['n']:,} samples per row, sample i from seed i
with digit i % 10, the same seeds in every row; {cfg['steps']} steps of the model's DPM-Solver++ scheduler;
digits FID against the 1,000-image training split. *RMS to CFG* is the RMS pixel distance (images in [0, 1])
to the CFG images of the same seeds at the same omega: it says how closely one pass reproduces CFG (FID on
digits improves as guidance weakens, so FID alone would reward an adapter that guides less).
Hardware: {bench.get('hardware', '-')}.

| omega | model | NFE / image | FID | accuracy | precision | recall | RMS to CFG |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}{gap}

Compositions (the shipped S³ schedules of `digits-schedules`, searched for CFG at omega 3; guidance dropped
for the last steps, the idea of Adaptive Guidance):

{extra_text}

Wall time per image at omega {cfg['time_scale']:g}, {cfg['steps']} steps (interleaved repeats, median, one
process; measured while the job had a small, varying share of a busy shared machine, so absolute times are
inflated and the ratios are noisy):

{wall_text}

## Training

{cfg['num_trajectories']} CFG trajectories of the frozen base ({cfg['steps']} DPM-Solver++ steps each, omega ~
U[1, {cfg['omega_max']:g}] drawn once per trajectory; `fastgen distill collect-trajectories`), then
{training['train_steps']} AdamW steps on batches of {training['batch_size']} stored rows (lr
{training['learning_rate']:g}, no weight decay, 10% warm-up then cosine decay; MSE to the stored
CFG-combined epsilon in fp32): {training['cpu_minutes']:.1f} CPU minutes ({training['wall_minutes']:.1f}
minutes wall on a shared 2-core machine).{fit_text}
Recipe `distill/digits-agd.yaml` (the benchmark overrides steps, batch, learning rate and folders):

```yaml
{recipe}
```

Rebuild: `python benchmarks/agd.py --work <folder>` then
`python scripts/make_digits_agd.py --run <folder>/run-trajectories --overwrite`.
"""


def sample_grid_png(adapter_folder: Path, path: Path) -> None:
    """CFG and AGD at each of ``GRID_SCALES`` on the same seeds (one row each, digits 0-9)."""
    import fastgen
    from fastgen.grid import image_grid

    pipe = fastgen.load_builtin("digits")
    pipe.set_progress_bar_config(disable=True)
    labels = list(range(10))
    images, rows = [], []
    for w in GRID_SCALES:
        for name in ("CFG", "AGD"):
            if name == "AGD":
                pipe.load_guidance_adapter(adapter_folder)
            out = pipe(class_labels=labels, guidance_scale=w, seed=0, num_inference_steps=20, output_type="pt")
            pipe.unload_guidance_adapter()
            images += [im.permute(1, 2, 0).repeat(1, 1, 3).numpy() for im in out.images.float().clamp(0, 1)]
            rows.append(f"{name} {w:g}")
    title = "rows: " + ", ".join(f"{r} ({'40' if r.startswith('CFG') else '20'} NFE)" for r in rows) + \
            "; same seeds 0-9 in every row"
    image_grid(images, ncols=10, row_labels=rows, title=title).save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the AGD training run folder of benchmarks/agd.py (run-trajectories)")
    parser.add_argument("--bench", default=str(BENCH), help="the benchmark's results JSON (figures of the card)")
    parser.add_argument("--out", default=str(OUT), help=f"asset folder (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing asset folder")
    args = parser.parse_args(argv)
    run, out, bench_path = Path(args.run), Path(args.out), Path(args.bench)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it.")
    if not bench_path.is_file():
        raise SystemExit(f"{bench_path} not found; run benchmarks/agd.py first.")
    import torch

    import fastgen
    from fastgen.adapters import GuidanceAdapter, resolve_adapter_folder

    torch.set_num_threads(1)
    src = resolve_adapter_folder(run)
    bench = json.loads(bench_path.read_text())
    adapter = GuidanceAdapter.from_pretrained(str(src))
    base = fastgen.load_builtin("digits").unet
    adapter.check_fits(base)
    scratch = out.with_name(f".{out.name}.build")
    shutil.rmtree(scratch, ignore_errors=True)
    staged = scratch / out.name
    adapter.save_pretrained(staged)  # config.json + safetensors, no machine paths
    config = json.loads((staged / "config.json").read_text())
    config.pop("_name_or_path", None)
    (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for weights in staged.glob("*.safetensors"):
        weights.chmod(0o644)
    (staged / "README.md").write_text(card(bench, config, adapter.num_parameters_trainable(),
                                           adapter.trainable_share(base)))
    figures = {"config": bench["config"], "training": bench["training"], "cells": bench["cells"],
               "summary": bench.get("summary"), "wall_time": bench.get("wall_time")}
    (staged / "eval.json").write_text(json.dumps(figures, indent=1) + "\n")
    sample_grid_png(staged, staged / "samples_grid.png")
    replace_folder(staged, out)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

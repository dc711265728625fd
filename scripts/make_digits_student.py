"""Build the built-in distilled student ``builtin:digits-1step`` from a finished ``fastgen distill`` run.

The student is trained by a committed recipe, then this script scores it with the one evaluator (digits
FID, accuracy, roughness, precision/recall on fixed seeds: sample i uses seed i and digit i % 10), copies
its pipeline folder into the package and writes the model card (recipe, training steps and CPU minutes,
figures beside the teacher's on the same seeds) and a sample grid.

    fastgen distill --config distill/digits-dmd2.yaml --max_train_steps 1200 --output-dir runs/digits-1step
    python scripts/make_digits_student.py --run runs/digits-1step --recipe distill/digits-dmd2.yaml

(the shipped build; any f-distill recipe works the same way, its divergence and any budget override are read
from the run and written into the card's command).

The run's exported student (``<run>/student``, the EMA weights at the end of training) is used unless
``--step N`` picks a checkpoint's EMA student instead (the run must still hold ``checkpoint-N``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from fastgen.benchmarking import CARD_KEYS, card_figures, publish_asset, teacher_cells

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "fastgen" / "assets" / "digits-1step"
BENCH = ROOT / "benchmarks" / "results" / "distill.json"


def student_folder(run: Path, step: int | None, scratch: Path) -> Path:
    """``<run>/student``, or the EMA student of ``checkpoint-<step>`` saved as a pipeline into ``scratch``."""
    if step is None:
        folder = run / "student"
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{folder} is not a student pipeline folder; did the run finish?")
        return folder
    import copy

    import fastgen
    from fastgen.pipelines.student import FastGenStudentPipeline
    from fastgen.training.checkpoint import network_state_dict, verify_checkpoint

    ckpt = run / f"checkpoint-{step}"
    verify_checkpoint(ckpt)
    config = json.loads((ckpt / "trainer_state.json").read_text())["config"]
    teacher = fastgen.load_builtin("digits")
    network = copy.deepcopy(teacher.unet)
    state = {k.removeprefix("network."): v for k, v in network_state_dict(ckpt / "student_ema").items()}
    network.load_state_dict(state, strict=True)
    folder = scratch / "student"
    FastGenStudentPipeline.from_teacher(teacher, network, config["student_timesteps"]).save_pretrained(folder)
    return folder


def card(record: dict, recipe_text: str, teacher: list[dict]) -> str:
    rows = [("one-step student (this model)", 1, record["student"])]
    rows += [(f"teacher, {cell['teacher']} (CFG {cell['guidance_scale']:g})", cell["nfe"], cell) for cell in teacher]
    minutes = record["cpu_minutes"]
    minutes_text = f"{minutes:.0f} CPU minutes (1 thread)" if minutes is not None else "CPU minutes not recorded"
    if record["method"] == "dmd2":
        how = ("by DMD2 (Yin et al. 2024,\narXiv:2405.14867; the reverse-KL case of f-distill, Xu et al. 2025, "
               "arXiv:2502.15681) on\nfastgen's trainer")
    else:
        how = (f"by f-distill (Xu et al. 2025,\narXiv:2502.15681) with the {record['divergence']} divergence on "
               "fastgen's DMD2 trainer (Yin et al. 2024,\narXiv:2405.14867)")
    command = f"fastgen distill --config distill/{record['recipe']}{record['overrides']}"
    return f"""# digits-1step: a one-step distilled student of the built-in digits model

One network evaluation per image, no guidance pass: the built-in `digits` teacher (20 steps of
classifier-free guidance at scale 2 = 40 evaluations) distilled {how}. Same architecture and weights format as the teacher (`UNet2DModel`, 16x16, 1 channel);
the student reads pure noise as its input at timestep t* = {', '.join(map(str, record['timesteps']))} and turns
its epsilon output into the image (`x0 = (z - sigma eps) / alpha`).

![samples](samples_grid.png)

## Use

```bash
fastgen sample --model builtin:digits-1step
```

```python
import fastgen
pipe = fastgen.load_builtin("digits-1step")          # FastGenStudentPipeline
images = pipe(class_labels=[0, 1, 2, 3], seed=0).images   # pipe.nfe == 1
```

Stock diffusers: `UNet2DModel.from_pretrained(<this folder>, subfolder="unet")` with
`LCMScheduler.from_pretrained(<this folder>, subfolder="scheduler")` and
`scheduler.set_timesteps(timesteps={record['timesteps']})` (see `fastgen/pipelines/student.py`).

{card_figures(record, rows)}

## Training

`{command}` ({record['step']} generator
steps, {minutes_text}, evaluations excluded;
exported: the EMA student at step {record['step']}). The recipe:

```yaml
{recipe_text.strip()}
```

Rebuild: run the command above with `--output-dir <run folder>`, then
`python scripts/make_digits_student.py --run <run folder> --recipe distill/{record['recipe']} --overwrite`.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished fastgen distill output_dir")
    parser.add_argument("--recipe", required=True, help="the recipe the run used (copied into the card)")
    parser.add_argument("--step", type=int, default=None, help="use checkpoint-STEP's EMA student, not the export")
    parser.add_argument("--n", type=int, default=2000, help="samples of the evaluation (default 2000)")
    parser.add_argument("--out", default=str(OUT), help=f"asset folder (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing asset folder")
    args = parser.parse_args(argv)
    run, recipe, out = Path(args.run), Path(args.recipe), Path(args.out)
    if not recipe.is_file():
        raise SystemExit(f"recipe {recipe} not found.")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it.")
    import torch

    from fastgen.metrics import evaluate_pipeline
    from fastgen.pipelines.student import FastGenStudentPipeline
    from fastgen.training.trainer import run_summary

    torch.set_num_threads(1)
    scratch = out.with_name(f".{out.name}.build")
    shutil.rmtree(scratch, ignore_errors=True)
    src = student_folder(run, args.step, scratch / "run")
    pipe = FastGenStudentPipeline.from_pretrained(src)
    res = evaluate_pipeline(pipe, args.n, seed=0, progress=True).to_dict()
    summary = run_summary(run, args.step)
    import platform

    from fastgen.cli.command import read_recipe
    from fastgen.training.config import DistillConfig

    config = summary["config"]
    method = config.get("method", "fdistill")
    overrides = f" --divergence {config.get('divergence', 'js')}" if method == "fdistill" else ""
    if config.get("max_train_steps") != read_recipe(recipe, DistillConfig).get("max_train_steps"):
        overrides += f" --max_train_steps {config['max_train_steps']}"  # e.g. a longer run than the benchmark's
    record = {"student": {k: res[k] for k in CARD_KEYS},
              "num_samples": args.n, "step": summary["step"], "cpu_minutes": summary["cpu_minutes"],
              "method": method, "divergence": "rkl" if method == "dmd2" else config.get("divergence", "js"),
              "overrides": overrides, "timesteps": pipe.student_timesteps,
              "recipe": recipe.name, "hardware": f"{platform.machine()} CPU, 1 torch thread"}
    staged = scratch / out.name
    shutil.copytree(src, staged)
    publish_asset(staged, out, card(record, recipe.read_text(), teacher_cells(BENCH, args.n)), record)
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

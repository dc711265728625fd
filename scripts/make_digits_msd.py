"""Build the built-in routed student ``builtin:digits-msd4`` from a finished ``fastgen distill --method msd`` run.

MSD (Song et al., arXiv:2410.23274): K one-step students of the digits teacher behind a class router. This
script scores the run's exported ``FastGenMSDPipeline`` (``<run>/student``: the EMA students at the end of
training) with the one evaluator (digits FID, accuracy, roughness, precision/recall on fixed seeds: sample i
uses seed i and digit i % 10, the seeds of benchmarks/results/distill.json), copies the folder into the
package (weights in float16 with ``--half-precision``, to keep the asset small) and writes the model card
(recipe, generator steps and CPU minutes, figures beside the teacher's and the one-step student's on the same
seeds), ``eval.json`` and a sample grid.

    fastgen distill --config distill/digits-msd4.yaml --output-dir runs/digits-msd4
    python scripts/make_digits_msd.py --run runs/digits-msd4 --recipe distill/digits-msd4.yaml

A run made of several recipes (the second and later resuming the first's output folder) lists them in order:
``--recipe distill/digits-msd4-compress.yaml distill/digits-msd4-compress-dm.yaml``.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

from fastgen.benchmarking import CARD_KEYS as KEYS, card_figures, publish_asset, teacher_cells

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "fastgen" / "assets" / "digits-msd4"
BENCH = ROOT / "benchmarks" / "results" / "distill.json"


def card(record: dict, recipe_texts: list[str], teacher: list[dict], single: dict | None) -> str:
    rows = [(f"{record['students']} routed students (this model)", 1, record["student"])]
    if single is not None:
        rows.append((f"one teacher-size student ({single['label']})", 1, single))
    rows += [(f"teacher, {cell['teacher']} (CFG {cell['guidance_scale']:g})", cell["nfe"], cell) for cell in teacher]
    parts = "; ".join(f"student {k}: digits {', '.join(map(str, classes))}"
                      for k, classes in enumerate(record["parts"]))
    minutes = record["cpu_minutes"]
    minutes_text = f"{minutes:.0f} CPU minutes (1 thread)" if minutes is not None else "CPU minutes not recorded"
    own, teacher_width = record["block_out_channels"], record["teacher_block_out_channels"]
    if own == [teacher_width]:
        width = "the teacher's architecture (block_out_channels " + ", ".join(map(str, teacher_width)) + ")"
    else:
        width = ("a smaller UNet (block_out_channels " + "; ".join(", ".join(map(str, c)) for c in own)
                 + " against the teacher's " + ", ".join(map(str, teacher_width)) + ")")
    readout = ("the network's output is x0" if record["prediction_type"] == "sample"
               else "`x0 = (z - sigma eps) / alpha`" if record["prediction_type"] == "epsilon"
               else f"the network predicts {record['prediction_type']}")
    options = json.loads(record["method_options"]) if isinstance(record.get("method_options"), str) else {}
    source = options.get("compress_from")
    compressed = (f" The students first regress the one-step student `{source}` (`compress_from`: x0 MSE on its map "
                  f"from noise and class to image), then train by DM + GAN; the minutes below do not count that "
                  f"source's own training.") if source else ""
    recipes = record["recipes"]
    commands = "\n".join(f"fastgen distill --config distill/{name} --output-dir <run folder>"
                          + (" --resume-from-checkpoint latest" if i else "") for i, name in enumerate(recipes))
    yaml_blocks = "\n\n".join(f"`distill/{name}`:\n\n```yaml\n{text.strip()}\n```"
                                for name, text in zip(recipes, recipe_texts))
    return f"""# digits-msd4: {record['students']} routed one-step students of the built-in digits model (MSD)

Multi-student distillation (Song et al. 2024, arXiv:2410.23274) of the built-in `digits` teacher (20 steps of
classifier-free guidance at scale 2 = 40 evaluations) on fastgen's DMD2 trainer (Yin et al. 2024,
arXiv:2405.14867): the ten digits are split among {record['students']} students ({parts}); a router sends each
requested digit to its student, so every image costs one network evaluation of one student. Each student is
{width}, read at timestep t* = {', '.join(map(str, record['timesteps']))}
({readout}). Weights stored as {record['weights_dtype']}.{compressed}

![samples](samples_grid.png)

## Use

```python
import fastgen
pipe = fastgen.load_builtin("digits-msd4")               # FastGenMSDPipeline (router + students)
images = pipe(class_labels=[0, 5, 9, 3], seed=0).images    # images in input order; pipe.nfe == 1
pipe.route([0, 5, 9, 3])                                  # the student of each digit
```

```bash
fastgen sample --model builtin:digits-msd4
```

{card_figures(record, rows)}

## Training

```bash
{commands}
```

{record['step']} generator steps of all students together, {minutes_text}, evaluations excluded; exported: the
EMA students at step {record['step']}. {"The recipes, run in this order (the second resumes the first's run folder):" if len(recipes) > 1 else "The recipe:"}

{yaml_blocks}

Rebuild: run the command{"s" if len(recipes) > 1 else ""} above, then
`python scripts/make_digits_msd.py --run <run folder> --recipe {" ".join("distill/" + r for r in recipes)} --overwrite`.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished fastgen distill --method msd output_dir")
    parser.add_argument("--recipe", required=True, nargs="+",
                        help="the recipe(s) the run used, in order (copied into the card)")
    parser.add_argument("--n", type=int, default=2000, help="samples of the evaluation (default 2000)")
    parser.add_argument("--single", default="rkl (DMD2), 1200 steps",
                        help="label of the one-student run in benchmarks/results/distill.json to show beside it (its evaluation "
                             "at the same generator steps, else its last)")
    parser.add_argument("--half-precision", action="store_true", help="store the students' weights as float16")
    parser.add_argument("--out", default=str(OUT), help=f"asset folder (default {OUT.relative_to(ROOT)})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing asset folder")
    args = parser.parse_args(argv)
    run, recipes, out = Path(args.run), [Path(r) for r in args.recipe], Path(args.out)
    for recipe in recipes:
        if not recipe.is_file():
            raise SystemExit(f"recipe {recipe} not found.")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it.")
    src = run / "student"
    if not (src / "model_index.json").is_file():
        raise SystemExit(f"{src} is not a pipeline folder; did the run finish?")
    import torch

    import fastgen
    from fastgen.metrics import evaluate_pipeline
    from fastgen.pipelines.msd import FastGenMSDPipeline
    from fastgen.training.trainer import run_summary

    torch.set_num_threads(1)
    scratch = out.with_name(f".{out.name}.build")
    shutil.rmtree(scratch, ignore_errors=True)
    staged = scratch / out.name
    pipe = FastGenMSDPipeline.from_pretrained(src)
    if args.half_precision:  # stored in float16, computed in float32 (the evaluation runs what is shipped)
        for net in pipe.students:
            net.to(torch.float16)
        pipe.save_pretrained(staged)
        pipe = FastGenMSDPipeline.from_pretrained(staged, torch_dtype=torch.float32)
    else:
        shutil.copytree(src, staged)
    res = evaluate_pipeline(pipe, args.n, seed=0, progress=False).to_dict()
    summary = run_summary(run)
    record = {"student": {k: res[k] for k in KEYS}, "num_samples": args.n, "step": summary["step"],
              "cpu_minutes": summary["cpu_minutes"], "students": len(pipe.students),
              "parts": [pipe.partition.classes_of(k) for k in range(pipe.partition.num_parts)],
              "block_out_channels": sorted({tuple(n.config.block_out_channels) for n in pipe.students}),
              "weights_dtype": "float16" if args.half_precision else "float32",
              "timesteps": pipe.student_timesteps, "recipes": [r.name for r in recipes],
              "prediction_type": pipe.scheduler.config.prediction_type, "method_options": summary["config"].get("method_options"),
              "hardware": f"{platform.machine()} CPU, 1 torch thread"}
    record["block_out_channels"] = [list(c) for c in record["block_out_channels"]]
    record["teacher_block_out_channels"] = list(fastgen.load_builtin("digits").unet.config.block_out_channels)
    teacher, single = teacher_cells(BENCH, args.n), None
    if teacher:
        students = json.loads(BENCH.read_text()).get("students", {})
        if args.single in students:  # at the MSD run's generator steps when it has them
            evals = students[args.single]["evaluations"]
            best = next((e for e in evals if e["step"] == summary["step"]), evals[-1])
            single = {"label": f"{args.single.split(',')[0]}, {best['step']} steps", **{k: best[k] for k in KEYS}}
    publish_asset(staged, out, card(record, [r.read_text() for r in recipes], teacher, single), {**record, "single": single})
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

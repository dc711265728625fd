"""`fastgen distill` (= `python -m fastgen.distill`) and the recipes in distill/: parsing, overrides, up-front validation (every bad
input is one clear error before any model loads), an end-to-end digits run with resume, and one trainer
step from the SD 1.5 / SDXL recipes on tiny models built from configs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastgen.cli import main as fastgen_main  # noqa: E402
from fastgen.cli.command import read_recipe  # noqa: E402
from fastgen.cli.distill import DistillCommandConfig  # noqa: E402
from fastgen.distill import main  # noqa: E402  (python -m fastgen.distill: the same command)
from fastgen.training.config import DistillConfig  # noqa: E402

def recipe_config(path, **overrides) -> DistillConfig:
    return DistillConfig(**{**read_recipe(path, DistillCommandConfig), **overrides})


RECIPES = sorted(p for p in (REPO / "distill").glob("*.yaml") if not p.name.startswith("accelerate-"))


def test_recipes_parse_and_validate():
    assert {p.name for p in RECIPES} >= {"digits-dmd2.yaml", "digits-fdistill-js.yaml", "sd15-dmd2.yaml", "sdxl-dmd2.yaml"}
    for recipe in RECIPES:
        config = recipe_config(recipe)
        config.validate(check_paths=recipe.name.startswith("digits"))
        config.method_config()  # method options accepted by the method's own config
    sd15 = recipe_config(REPO / "distill" / "sd15-dmd2.yaml")
    assert (sd15.learning_rate, sd15.guidance_scale, sd15.critic_steps_per_generator_step, sd15.student_timesteps,
            sd15.mixed_precision) == (1e-5, 1.75, 10, [999], "bf16")
    sdxl = recipe_config(REPO / "distill" / "sdxl-dmd2.yaml")
    assert (sdxl.learning_rate, sdxl.guidance_scale, sdxl.student_timesteps, sdxl.max_grad_norm) == (5e-7, 8.0, [399], 10.0)
    assert sdxl.method_config().gan_weight_generator == 5e-3 and sdxl.method_config().dm_time == (20, 980)


def test_command_line_overrides_the_recipe_and_divergences_by_override(capsys):
    recipe = str(REPO / "distill" / "digits-fdistill-js.yaml")
    assert fastgen_main(["distill", "--config", recipe, "--divergence", "kl", "--max-train-steps", "7",
                         "--critic_steps_per_generator_step", "5", "--validate-only", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = DistillConfig(**record["config"])
    # flags win over the recipe, even a flag equal to the built-in default (recipe: 3 critic steps, default 5)
    assert (config.method, config.divergence, config.max_train_steps, config.critic_steps_per_generator_step) == (
        "fdistill", "kl", 7, 5)
    assert config.learning_rate == 3e-5 and config.method_config().ratio_upper == 20.0  # from the recipe
    assert record["valid"] and record["processes"] == 1
    for divergence in ("rkl", "kl", "js", "sh", "jf", "sf", "neyman"):
        recipe_config(recipe, divergence=divergence).validate()


def test_method_flags_set_one_key_of_the_recipes_method_options(capsys):
    """--base-method / --nodes / --interval / --students (issue 12's spelling) override only their own key of a
    recipe's method_options; the rest of the mapping stays the recipe's."""
    recipe = str(REPO / "distill" / "digits-disback.yaml")
    assert fastgen_main(["distill", "--config", recipe, "--nodes", "1", "--interval", "10", "--base-method", "fdistill",
                         "--validate-only", "--json"]) == 0
    config = DistillConfig(**json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"])
    options = config.method_config()
    assert (options.nodes, options.interval, options.base_method) == (1, 10, "fdistill")
    assert (options.record_interval, options.label_dropout, options.gan_weight_generator, options.dm_time) == (
        25, 0.1, 1.0, (20, 250))  # the recipe's
    assert recipe_config(recipe).method_config().nodes == 4
    msd = recipe_config(REPO / "distill" / "digits-msd4.yaml", students=2).method_config()
    assert (msd.students, msd.schedule, msd.base_method) == (2, "routed", "dmd2")


def test_method_flags_name_exactly_the_methods_whose_configs_have_them():
    import dataclasses

    from fastgen.training.config import METHOD_FLAGS, METHODS

    for method in METHODS:
        config_cls = getattr(DistillConfig(method=method).method_class(), "config_class", None)
        names = {f.name for f in dataclasses.fields(config_cls)} if config_cls else set()
        for flag, methods in METHOD_FLAGS.items():
            assert (flag in names) == (method in methods), (flag, method)


BAD_INPUTS = [
    (["--method", "consistency"], "method: unknown method"),
    (["--method", "fdistill", "--divergence", "tv"], "divergence: unknown divergence"),
    (["--teacher", "/nonexistent/teacher"], "teacher:"),
    (["--teacher", "builtin:nope"], "teacher: unknown built-in"),
    (["--train_batch_size", "10", "--gradient_accumulation_steps", "3"], "train_batch_size:"),
    (["--max_train_steps", "0"], "max_train_steps:"),
    (["--learning_rate", "0"], "learning_rate:"),
    (["--learning_rate_critic=-1e-4"], "learning_rate_critic:"),
    (["--learning_rate_discriminator", "0"], "learning_rate_discriminator:"),
    (["--critic_steps_per_generator_step", "0"], "critic_steps_per_generator_step:"),
    (["--student_timesteps", "1200"], "student_timesteps: [1200] do not fit the teacher"),
    (["--student_timesteps", "300", "700"], "student_timesteps:"),
    (["--student_renoise", "ode"], "student_renoise: accepted: fresh, ddim"),
    (["--method_options", '{"student_step_draw": "row"}'], "student_step_draw must be one of ('batch', 'sample')"),
    (["--method_options", '{"student_grad_space": "eps"}'], "student_grad_space must be one of ('x0', 'output')"),
    (["--method_options", '{"dm_step_weights": [1, 0]}'], "dm_step_weights must be one non-negative number per student step (1 for"),
    (["--method_options", '{"dm_step_guidance": [2, 1]}'], "dm_step_guidance must be one finite guidance scale >= 0 per student step (1 for"),
    (["--method_options", '{"later_step_target": "teacher"}'], "later_step_target 'teacher' trains the later steps of a few-step student"),
    (["--method_options", '{"critic_samples": "last"}'], "critic_samples must be one of ('step', 'final')"),
    (["--method_options", '{"gan_weigth_generator": 1}'], "method_options: dmd2 does not accept ['gan_weigth_generator']"),
    (["--method", "fdistill", "--method_options", '{"gan_weight_discriminator": 0, "gan_weight_generator": 0}'],
     "needs the discriminator's density ratio"),
    (["--method", "disback", "--method_options",
      '{"record_discriminator": true, "gan_weight_discriminator": 0, "gan_weight_generator": 0}'],
     "record_discriminator: true needs the GAN term"),
    (["--nodes", "2"], "nodes: applies to --method disback only, not dmd2"),
    (["--method", "fdistill", "--students", "4"], "students: applies to --method msd only, not fdistill"),
    (["--method", "msd", "--students", "0"], "--students must be a positive integer, got 0"),
    (["--method", "disback", "--base-method", "ddpm"], "--base-method must be one of ('dmd2', 'fdistill'), got 'ddpm'"),
    (["--method", "disback", "--advance", "fid"], "--advance must be one of ('interval', 'plateau'), got 'fid'"),
    (["--method", "disback", "--advance", "plateau"], "validation_steps: advance 'plateau' reads the in-training FID"),
    (["--mixed_precision", "fp8"], "mixed_precision:"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-5"], "resume_from_checkpoint:"),
    (["--dataset", "/nonexistent/images"], "dataset:"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[m.split(":")[0][:30] for _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_error_before_any_model_loads(argv, message, monkeypatch, capsys, tmp_path):
    import fastgen.training.teacher as teacher_module

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before validation")
    monkeypatch.setattr(teacher_module, "load_teacher", no_load)
    monkeypatch.setattr(teacher_module, "load_pipeline", no_load)
    assert main([*argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgen distill: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_unknown_recipe_key_names_the_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: dmd2\nlearning_rat: 0.1\n")
    assert main(["--config", str(recipe), "--validate_only"]) == 2
    assert "unknown options ['learning_rat']" in capsys.readouterr().err


def test_text_teacher_without_prompts_is_an_error(tmp_path, capsys):
    from tiny import tiny_sd
    folder = tmp_path / "sd"
    tiny_sd(tmp_path).save_pretrained(folder)
    assert main(["--teacher", str(folder), "--student_timesteps", "999", "--dataset", "none", "--validate_only"]) == 2
    assert "prompts: the teacher" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end
def test_digits_recipe_end_to_end_with_resume_and_student_pipeline(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", str(REPO / "distill" / "digits-fdistill-js.yaml"), "--output_dir", str(out),
            "--train_batch_size", "4", "--critic_steps_per_generator_step", "1", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "1", "--validation_steps", "2", "--num_validation_samples", "10",
            "--logging_steps", "1", "--progress", "false", "--json"]
    assert main([*args, "--max_train_steps", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and (out / "samples" / "step-0000002.png").is_file()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {"generator/dm", "generator/h_mean", "critic/dsm", "critic/disc", "grad_norm/generator"} <= set(log[0])
    assert abs(log[0]["generator/h_mean"] - 1.0) < 1e-4  # f-distill's normalised weight
    assert main([*args, "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["step"], summary["steps_this_run"]) == (3, 1)
    state = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=True)
    assert "ratio_ema" in state["method"]  # f-distill's per-bin state lives in the trainer checkpoint
    from fastgen.pipelines.student import FastGenStudentPipeline
    pipe = FastGenStudentPipeline.from_pretrained(out / "student")
    assert pipe.student_timesteps == [500] and pipe.nfe == 1
    from fastgen.training import read_run_log
    rows = read_run_log(out)  # evaluations with the training minutes up to them, evaluation time excluded
    evals = [r for r in log if "eval/fid" in r]
    assert [r["step"] for r in rows] == [r["step"] for r in evals] == [2] and rows[0]["fid"] == evals[0]["eval/fid"]
    assert rows[0]["cpu_minutes"] is not None and 0 < rows[0]["cpu_minutes"] <= rows[0]["wall_minutes"] * 2 + 1
    assert "ratio" not in " ".join(pipe.unet.state_dict())  # no trainer state leaked into the student


def test_two_step_ddim_recipe_trains_and_exports_a_ddim_student(tmp_path, capsys):
    """The two-step recipe (student_renoise: ddim) resumed from a one-step checkpoint written before the option
    existed: the resume reports both changed options, and the exported folder runs the deterministic chain
    (TCDScheduler, student_renoise)."""
    out = tmp_path / "run"
    args = ["--config", str(REPO / "distill" / "digits-dmd2-2step.yaml"), "--output_dir", str(out),
            "--train_batch_size", "4", "--critic_steps_per_generator_step", "1", "--checkpointing_steps", "1",
            "--validation_steps", "100", "--num_validation_samples", "10", "--progress", "false", "--json"]
    assert main([*args, "--max_train_steps", "1", "--student_timesteps", "500", "--student_renoise", "fresh"]) == 0
    record = out / "checkpoint-1" / "trainer_state.json"  # as written before student_renoise existed
    state = json.loads(record.read_text())
    assert state["config"].pop("student_renoise") == "fresh"
    record.write_text(json.dumps(state))
    from fastgen.training.checkpoint import write_marker
    write_marker(out / "checkpoint-1", 1)
    assert main([*args, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]) == 0  # the recipe's ddim
    printed = "".join(capsys.readouterr())
    assert "student_timesteps: [500] -> [500, 20]" in printed and "student_renoise: 'fresh' -> 'ddim'" in printed, printed
    from diffusers import TCDScheduler
    from fastgen.pipelines.student import FastGenStudentPipeline
    pipe = FastGenStudentPipeline.from_pretrained(out / "student")
    assert pipe.student_timesteps == [500, 20] and pipe.student_renoise == "ddim"
    assert isinstance(pipe.scheduler, TCDScheduler)


def _tiny_text_run(tmp_path, recipe: str, pipe, capsys):
    from safetensors.torch import save_file
    teacher = tmp_path / "teacher"
    pipe.save_pretrained(teacher)
    latents = tmp_path / "latents.safetensors"
    save_file({"latents": torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))}, str(latents))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na photo of a house\n")
    out = tmp_path / "run"
    assert main(["--config", str(REPO / "distill" / recipe), "--teacher", str(teacher), "--dataset", str(latents),
                 "--prompts", str(prompts), "--output_dir", str(out), "--train_batch_size", "2",
                 "--max_train_steps", "1", "--critic_steps_per_generator_step", "1", "--mixed_precision", "no",
                 "--resume_from_checkpoint", "latest", "--validation_steps", "1", "--num_validation_samples", "2",
                 "--progress", "false", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 1 and (out / "checkpoint-1" / "COMPLETE.json").is_file()
    assert (out / "samples" / "step-0000001.png").is_file() and (out / "student").is_dir()
    return out


def test_sd15_recipe_one_step_on_a_tiny_sd_unet(tmp_path, capsys):
    from tiny import tiny_sd
    _tiny_text_run(tmp_path, "sd15-dmd2.yaml", tiny_sd(tmp_path), capsys)


def test_sdxl_recipe_one_step_on_a_tiny_sdxl_unet(tmp_path, capsys):
    from tiny import tiny_sdxl
    _tiny_text_run(tmp_path, "sdxl-dmd2.yaml", tiny_sdxl(tmp_path), capsys)


def test_group_learning_rates_fall_back_discriminator_to_critic_to_generator():
    c = DistillConfig(learning_rate=1e-5)
    assert [c.group_learning_rate(g) for g in ("generator", "critic", "discriminator")] == [1e-5] * 3
    c = DistillConfig(learning_rate=1e-5, learning_rate_critic=2e-5)
    assert [c.group_learning_rate(g) for g in ("generator", "critic", "discriminator")] == [1e-5, 2e-5, 2e-5]
    c = DistillConfig(learning_rate=1e-5, learning_rate_critic=2e-5, learning_rate_discriminator=3e-4)
    assert [c.group_learning_rate(g) for g in ("generator", "critic", "discriminator")] == [1e-5, 2e-5, 3e-4]


def test_config_round_trips_through_the_checkpoint(tmp_path):
    config = DistillConfig(output_dir=str(tmp_path), method_options='{"r1_weight": 100}')
    assert DistillConfig(**config.to_dict()).method_config().r1_weight == 100

"""The generic distillation trainer (fastgen/training): exact resume after SIGKILL, atomic checkpoints,
rotation, 2-process equivalence, per-iteration overhead — all with a tiny toy method.

The toy method regresses a tiny conv generator to a fixed per-class target (generator phase) and fits
a tiny critic to detached generator samples at a random "time" drawn from ``batch.generator`` (critic
phase), and keeps a trainer-state counter, so every piece of state the trainer must restore matters.
Run as a script (``python tests/test_trainer.py OUT [key=value ...]``) it trains the toy method; the
tests launch it in subprocesses (plain, killed, resumed, and under ``accelerate launch`` with 2
processes).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastgen.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, verify_checkpoint  # noqa: E402
from fastgen.training.config import DistillConfig  # noqa: E402
from fastgen.training.method import Batch, DistillMethod  # noqa: E402

SHAPE = (1, 8, 8)
NUM_CLASSES = 3


class ToyMethod(DistillMethod):
    name = "toy"
    needs_real_data = True

    def __init__(self, width: int = 8, kill_at_step: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.generator = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.SiLU(),
                                             torch.nn.Conv2d(width, 1, 3, padding=1))
        self.critic = torch.nn.Sequential(torch.nn.Conv2d(2, width, 3, padding=1), torch.nn.SiLU(),
                                          torch.nn.Conv2d(width, 1, 3, padding=1))
        self.targets = torch.linspace(-1, 1, NUM_CLASSES * 64).reshape(NUM_CLASSES, 1, 8, 8)
        self.counter = torch.zeros(())
        self.kill_at_step = kill_at_step

    def optimizer_groups(self):
        return {"generator": list(self.generator.parameters()), "critic": list(self.critic.parameters())}

    def generator_loss(self, batch: Batch):
        if self.kill_at_step is not None and int(self.counter) == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # die between checkpoints, mid-step
        self.counter += 1
        x = self.generator(batch.noise)
        target = self.targets.to(x.device)[batch.labels]
        loss = ((x - target) ** 2).mean()
        # the critic's opinion enters the generator loss (gradients must not reach critic params)
        t = torch.rand(x.shape[0], 1, 1, 1, generator=batch.generator, device=x.device)
        adv = self.critic(torch.cat([x, t.expand_as(x)], 1)).mean()
        return {"loss": loss + 0.01 * adv, "mse": loss}

    def critic_loss(self, batch: Batch):
        with torch.no_grad():
            x = self.generator(batch.noise)
        t = torch.rand(x.shape[0], 1, 1, 1, generator=batch.generator, device=x.device)
        noisy = (1 - t) * x + t * torch.randn(x.shape, generator=batch.generator, device=x.device)
        pred = self.critic(torch.cat([noisy, t.expand_as(x)], 1))
        loss = ((pred - x) ** 2).mean() + 0.1 * ((self.critic(torch.cat([batch.real, t.expand_as(x)], 1))) ** 2).mean()
        return {"loss": loss}

    def trainer_state(self):
        return {"counter": self.counter.clone()}

    def load_trainer_state(self, state):
        self.counter.copy_(state["counter"])

    def student(self):
        return self.generator

    def sample(self, noise, labels):
        return self.generator(noise)


def toy_real_data(seed: int = 0):
    from fastgen.training.data import RealData
    g = torch.Generator().manual_seed(123)
    rows = torch.randn(20, *SHAPE, generator=g)

    def fetch(idx):
        return rows[idx], None
    return RealData(fetch, len(rows), seed=seed)


def toy_config(out, **overrides) -> DistillConfig:
    base = dict(output_dir=str(out), teacher="builtin:digits", train_batch_size=8, max_train_steps=12,
                critic_steps_per_generator_step=2, gradient_accumulation_steps=2, checkpointing_steps=4,
                learning_rate=1e-2, lr_warmup_steps=3, max_grad_norm=1.0, ema_decay=0.9, logging_steps=2,
                report_to="none", progress=False, mixed_precision="no", seed=5)
    base.update(overrides)
    return DistillConfig(**base)


def run_toy(out, kill_at_step=None, width=8, **overrides):
    from fastgen.training.trainer import DistillTrainer
    config = toy_config(out, **overrides)
    trainer = DistillTrainer(config, method=ToyMethod(width, kill_at_step), real_data=toy_real_data(config.seed),
                             sample_shape=SHAPE, num_classes=NUM_CLASSES)
    return trainer, trainer.train()


def _weights(folder) -> dict[str, torch.Tensor]:
    from fastgen.training.checkpoint import network_state_dict
    return network_state_dict(folder)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _script(out, *args, launch: list[str] | None = None, check=True):
    cmd = [*(launch or [sys.executable]), str(Path(__file__).resolve()), str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- fixtures
class single_thread:
    """Run in-process training with one thread, as the OMP_NUM_THREADS=1 subprocesses do (same reductions)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted toy run (1 process, 2 accumulation micro-batches)."""
    out = tmp_path_factory.mktemp("ref")
    with single_thread():
        run_toy(out, checkpoints_total_limit=2)
    return out


# ----------------------------------------------------------------------------- resume
def test_sigkill_between_checkpoints_then_resume_latest_matches_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = _script(out, "kill_at_step=20", "checkpoints_total_limit=2", check=False)  # 21st generator micro-step
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(out)] == [4, 8]  # killed in generator step 11, after logging step 10
    assert json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])["step"] == 10
    with single_thread():
        run_toy(out, resume_from_checkpoint="latest", checkpoints_total_limit=2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8, 10, 12]  # the interrupted run's step-10 record was dropped
    for name in ("student", "checkpoint-12/generator", "checkpoint-12/critic", "checkpoint-12/student_ema"):
        assert _max_diff(_weights(reference_run / name), _weights(out / name)) <= 1e-6, name
    ref_log = [json.loads(line) for line in (reference_run / "train_log.jsonl").read_text().splitlines()]
    assert abs(ref_log[-1]["generator/loss"] - log[-1]["generator/loss"]) <= 1e-6
    # the method's trainer state was restored: 12 generator steps x 2 micro-batches
    state = torch.load(out / "checkpoint-12" / "trainer_state.pt", weights_only=True)
    assert int(state["method"]["counter"]) == 24


def test_rotation_keeps_the_limit(reference_run):
    assert [s for s, _ in list_checkpoints(reference_run)] == [8, 12]
    assert not list(reference_run.glob("*.tmp"))


def test_truncated_checkpoint_is_a_clear_error_and_latest_falls_back(reference_run, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(reference_run, out)
    bad = out / "checkpoint-12" / "optimizer.bin"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.bin"):
        verify_checkpoint(out / "checkpoint-12")
    assert latest_checkpoint(out) == out / "checkpoint-8"
    # an explicit path to it: a clear error with the file's name
    with pytest.raises(CheckpointError, match=r"optimizer\.bin.*truncated"):
        run_toy(out, resume_from_checkpoint=str(out / "checkpoint-12"))
    # latest resumes from checkpoint-8 and retrains 9..12 to the same weights
    with single_thread():
        run_toy(out, resume_from_checkpoint="latest", checkpoints_total_limit=2)
    assert _max_diff(_weights(reference_run / "student"), _weights(out / "student")) <= 1e-6


def test_save_interrupted_before_the_marker_leaves_no_complete_looking_checkpoint(reference_run, tmp_path, monkeypatch):
    import fastgen.training.checkpoint as ckpt
    out = tmp_path / "savekill"
    original = ckpt.write_marker

    def dying(folder, step):  # the process dies while writing the marker of checkpoint 8
        if step == 8:
            raise KeyboardInterrupt("killed while saving")
        return original(folder, step)
    monkeypatch.setattr(ckpt, "write_marker", dying)
    with pytest.raises(KeyboardInterrupt), single_thread():
        run_toy(out)
    monkeypatch.setattr(ckpt, "write_marker", original)
    assert (out / "checkpoint-8.tmp").is_dir() and not (out / "checkpoint-8").exists()
    assert latest_checkpoint(out) == out / "checkpoint-4"
    with single_thread():
        run_toy(out, resume_from_checkpoint="latest")
    assert not (out / "checkpoint-8.tmp").exists()
    assert _max_diff(_weights(reference_run / "student"), _weights(out / "student")) <= 1e-6


# ----------------------------------------------------------------------------- processes
def test_two_processes_equal_one_process_at_the_same_global_batch(reference_run, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    _script(out, "gradient_accumulation_steps=1", "checkpoints_total_limit=2", launch=launch)
    # 2 processes x 1 micro-batch see the chunks of 1 process x 2 micro-batches
    for name in ("student", "checkpoint-12/generator", "checkpoint-12/critic"):
        assert _max_diff(_weights(reference_run / name), _weights(out / name)) <= 1e-5, name
    assert (out / "checkpoint-12" / "random_states_1.pkl").is_file()


# ----------------------------------------------------------------------------- behaviour in process
def test_phases_do_not_leak_gradients_and_lr_warms_up(tmp_path):
    trainer, summary = run_toy(tmp_path / "run", max_train_steps=3, checkpointing_steps=100, logging_steps=1)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    # warm-up of 3 generator steps: lr 1/3, 2/3, 1 of the base; the critic warms up over 3 x 2 updates
    assert [round(r["lr/generator"] / 1e-2, 6) for r in log] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]
    assert [round(r["lr/critic"] / 1e-2, 6) for r in log] == [round(2 / 6, 6), round(4 / 6, 6), 1.0]
    assert all(p.grad is None for p in trainer.method.parameters())
    assert summary["step"] == 3 and (tmp_path / "run" / "checkpoint-3" / "COMPLETE.json").is_file()


def test_real_data_stream_is_a_seeded_permutation_per_epoch_and_position_addressed():
    data = toy_real_data(seed=3)
    first = data.indices(0, 20)
    assert sorted(first.tolist()) == list(range(20))                     # epoch 0 is a permutation
    assert sorted(data.indices(20, 20).tolist()) == list(range(20))       # so is epoch 1
    assert not torch.equal(first, data.indices(20, 20))                   # a different one
    across = data.indices(15, 10)                                         # spans the epoch boundary
    assert torch.equal(across, torch.cat([first[15:], data.indices(20, 5)]))
    assert torch.equal(toy_real_data(seed=3).indices(15, 10), across)     # a fresh source (resume) agrees
    assert not torch.equal(toy_real_data(seed=4).indices(0, 20), first)  # the trainer seed matters


def test_evaluation_writes_a_grid(tmp_path):
    run_toy(tmp_path / "run", max_train_steps=2, validation_steps=2, num_validation_samples=12,
            validation_batch_size=5, checkpointing_steps=100)
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


def test_trainer_overhead_vs_a_hand_written_loop(tmp_path, capsys):
    """Seconds per generator step of the trainer (steady state, from its own log) vs a minimal loop doing the
    same forward/backward/clip/AdamW work (no EMA, no checkpoint inside the timed window)."""
    steps, width = 20, 48
    with single_thread():
        def trainer_time(rep):
            run_toy(tmp_path / f"timed{rep}", width=width, max_train_steps=2 * steps, use_ema=False,
                    logging_steps=steps, checkpointing_steps=1000, gradient_accumulation_steps=1)
            log = [json.loads(line) for line in (tmp_path / f"timed{rep}" / "train_log.jsonl").read_text().splitlines()]
            return log[1]["seconds_per_step"]  # steps 21..40

        method = ToyMethod(width)
        groups = method.optimizer_groups()
        opts = {g: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01) for g, ps in groups.items()}
        real = toy_real_data()
        gen = torch.Generator().manual_seed(0)

        def one_step(step):
            for phase, group, repeat in (("critic", "critic", 2), ("generator", "generator", 1)):
                for _ in range(repeat):
                    batch = Batch(labels=torch.randint(0, NUM_CLASSES, (8,), generator=gen),
                                  noise=torch.randn(8, *SHAPE, generator=gen), real=real.rows(step * 8, 8)[0],
                                  generator=gen)
                    method(phase, batch)["loss"].backward()
                    torch.nn.utils.clip_grad_norm_(groups[group], 1.0)
                    opts[group].step()
                    for o in opts.values():
                        o.zero_grad(set_to_none=True)

        def loop_time():
            t0 = time.perf_counter()
            for step in range(steps):
                one_step(step)
            return (time.perf_counter() - t0) / steps

        loop_time()  # warm-up
        # Interleaved, each side's best of 3: this machine's speed shifts between whole phases (~8.5 vs ~13.5
        # ms/step here), so one side timed in a slow phase alone could fail the bound.
        pairs = [(trainer_time(rep), loop_time()) for rep in range(3)]
        trainer_s, loop_s = min(t for t, _ in pairs), min(l for _, l in pairs)
    ratio = trainer_s / loop_s
    with capsys.disabled():
        print(f"\n[trainer overhead] trainer {trainer_s * 1e3:.2f} ms/step, hand-written loop {loop_s * 1e3:.2f} ms/step, "
              f"ratio {ratio:.3f}")
    assert ratio < 1.5  # target <= 1.10; generous bound for a shared 2-core machine (the ratio is printed)


# ----------------------------------------------------------------------------- script mode
def _main(argv):
    out, *pairs = argv
    overrides, kill_at_step = {}, None
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key == "kill_at_step":
            kill_at_step = int(value)
        else:
            overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    try:
        run_toy(out, kill_at_step=kill_at_step, **overrides)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def test_run_summary_reads_the_exported_step_and_the_newest_checkpoint(tmp_path):
    """``run_summary``: the last evaluated step and its CPU minutes from ``train_log.jsonl``, the configuration
    of the newest checkpoint by step number (``checkpoint-1000`` after ``checkpoint-200``, not by name)."""
    from fastgen.training import run_summary

    lines = [{"step": 100, "seconds_per_step": 2.0, "cpu_seconds_per_step": 1.2},
             {"step": 100, "eval/fid": 5.0},
             {"step": 200, "seconds_per_step": 2.0, "cpu_seconds_per_step": 0.6},
             {"step": 200, "eval/fid": 4.0}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for step, divergence in ((200, "js"), (1000, "kl")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"config": {"divergence": divergence}}))
    summary = run_summary(tmp_path)
    assert summary == {"step": 200, "cpu_minutes": 3.0, "config": {"divergence": "kl"}}
    assert run_summary(tmp_path, step=100)["cpu_minutes"] == 2.0


def test_run_log_minutes_of_a_run_warm_started_from_another_folders_checkpoint(tmp_path):
    """A run resumed from a checkpoint copied out of another run starts its log at that checkpoint's step: its
    first window counts the steps it ran (``steps_in_window``), not every step before it."""
    from fastgen.training import read_run_log

    lines = [{"step": 1010, "seconds_per_step": 1.5, "cpu_seconds_per_step": 1.2, "steps_in_window": 10},
             {"step": 1020, "seconds_per_step": 1.5, "cpu_seconds_per_step": 1.2, "steps_in_window": 10},
             {"step": 1020, "eval/fid": 2.0}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert read_run_log(tmp_path) == [{"step": 1020, "wall_minutes": 0.5, "cpu_minutes": 0.4, "fid": 2.0,
                                       "accuracy": None, "roughness": None, "precision": None, "recall": None}]

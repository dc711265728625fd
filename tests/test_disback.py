"""DisBack (fastgen/training/disback.py): the node path, node storage, resume mid-path (spec distillation.md 3.3)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fastgen.denoiser import Denoiser  # noqa: E402
from fastgen.guidance import CFG  # noqa: E402
from fastgen.training.checkpoint import CheckpointError  # noqa: E402
from fastgen.training.config import DistillConfig  # noqa: E402
from fastgen.training.disback import DisBack, DisBackConfig  # noqa: E402
from fastgen.training.method import Batch  # noqa: E402

from tiny import tiny_class_unet  # noqa: E402

SHAPE = (1, 8, 8)
NODES, RECORD, INTERVAL = 3, 2, 2  # stage 1: steps 0..5; stage 2: nodes 2, 1 on steps 6..9, teacher from 10


def _teacher():
    return Denoiser.from_scheduler(tiny_class_unet(), DDPMScheduler())


def _method(out, **options):
    kwargs = dict(nodes=NODES, record_interval=RECORD, interval=INTERVAL, output_dir=str(out),
                  gan_weight_generator=0.0, gan_weight_discriminator=0.0)
    kwargs.update(options)
    torch.manual_seed(0)
    return DisBack(_teacher(), guider=CFG(2.0), **kwargs)


def _batch(seed, b=4):
    g = torch.Generator().manual_seed(seed)
    return Batch(labels=torch.randint(0, 10, (b,), generator=g), noise=torch.randn(b, *SHAPE, generator=g),
                 real=None, generator=torch.Generator().manual_seed(seed + 100))


def _checksum(tensors) -> float:
    return float(sum((p.detach().double() * (1 + i % 7)).sum() for i, p in enumerate(tensors)))


def _run(method, steps, start=0):
    """A minimal trainer: the hook, one critic and (when the method trains it) one generator AdamW update per
    step; checksums per step."""
    opts = {k: torch.optim.AdamW(v, lr=1e-3) for k, v in method.optimizer_groups().items()}
    trace = []
    for step in range(start, steps):
        method.begin_generator_step(step)
        trace.append((step, method.node, _checksum(method.real_score_parameters())))
        for phase in ("critic", "generator")[:2 if method.trains_generator else 1]:
            out = method(phase, _batch(2 * step + (phase == "generator")))
            out["loss"].backward()
            for k, o in opts.items():
                if (k == "generator") == (phase == "generator"):
                    o.step()
                o.zero_grad(set_to_none=True)
    return trace


@pytest.mark.parametrize("storage", ["full", "lora"])
def test_nodes_visited_once_in_order_ending_on_the_teacher(tmp_path, storage):
    if storage == "lora":
        pytest.importorskip("peft")
    m = _method(tmp_path, lora_fake_score=(storage == "lora"), lora_rank=4)
    assert m.storage == storage
    student0 = {k: v.clone() for k, v in m.student_module.state_dict().items()}
    teacher_sum = _checksum(m.real_score_parameters())
    trace = _run(m, 14)
    nodes = [n for _, n, _ in trace]
    assert nodes == [None] * 6 + [2, 2, 1, 1, 0, 0, 0, 0]
    assert m.visited == [2, 1, 0]  # N-1 ... 0, each once, ending on the teacher
    assert sorted(p.name for p in (tmp_path / "disback_nodes").iterdir()) == [
        "node-001.safetensors", "node-002.safetensors", "node-003.safetensors"]
    # each switch changes the real score's checksum; node 0 is the untouched teacher
    sums = {n: s for _, n, s in trace if n is not None}
    assert len({round(s, 6) for s in sums.values()}) == 3
    assert sums[0] == teacher_sum
    # the student was frozen through stage 1 (no gradient, no weight decay), then trained
    after_stage1 = m.student_module.state_dict()
    assert any(not torch.equal(after_stage1[k], student0[k]) for k in student0)
    m2 = _method(tmp_path / "b", lora_fake_score=(storage == "lora"), lora_rank=4)
    _run(m2, 6)
    assert all(torch.equal(v, student0[k]) for k, v in m2.student_module.state_dict().items())


def test_fake_score_starts_equal_to_node_n_and_differs_from_the_teacher(tmp_path):
    from safetensors.torch import load_file

    m = _method(tmp_path)
    _run(m, 6)
    teacher = {k: v.clone() for k, v in m.fake_network.state_dict().items()}
    m.begin_generator_step(6)  # stage 2 begins: node N written, node N-1 loaded
    node_n = load_file(str(m.node_path(NODES)))
    fake = m.fake_network.state_dict()
    assert set(node_n) == set(fake) and all(torch.equal(node_n[k], fake[k]) for k in fake)
    assert all(torch.equal(teacher[k], fake[k]) for k in fake)  # the hook changed nothing else
    base = m.teacher_denoiser.model.state_dict()
    assert any(not torch.equal(fake[k], base[k]) for k in fake)  # stage 1 did train it
    node_prev = load_file(str(m.node_path(NODES - 1)))
    assert all(torch.equal(v, node_prev[k]) for k, v in m.node_network.state_dict().items())
    # the generator's real score is node N-1 with the teacher's CFG, not the teacher
    x, t, labels = torch.randn(2, *SHAPE), torch.tensor([300, 700]), torch.tensor([1, 2])
    cond, uncond = m._conditions(labels)
    real = m._teacher_x0(x, t, cond, uncond)
    with torch.no_grad():
        assert not torch.allclose(real, m.teacher(x, t, cond=cond, uncond=uncond).x0)
        from fastgen.denoiser import GuidedDenoiser
        node_guided = GuidedDenoiser(Denoiser(m.node_network, m.teacher_denoiser.schedule), guider=CFG(2.0))
        assert torch.allclose(real, node_guided(x, t, cond=cond, uncond=uncond).x0)
        # dm_step_guidance's per-row CFG reads the node too: scale 2 is the node's CFG-2 x0, scale 1 its
        # conditional x0
        per_row = m._teacher_x0(x, t, cond, uncond, torch.tensor([2.0, 1.0]))
        assert torch.allclose(per_row[:1], real[:1], atol=1e-5)
        assert torch.allclose(per_row[1:], node_guided.denoiser.predict(x, t, cond)[0][1:], atol=1e-6)


def test_recording_uses_label_dropout(tmp_path):
    """Stage-1 DSM sees the null class on about label_dropout of the rows (the unconditional branch is trained)."""
    m = _method(tmp_path, label_dropout=0.5)
    seen = []
    handle = m.fake_network.class_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    for seed in range(20):
        m.critic_loss(_batch(seed, b=8))  # stage 1: the recording DSM
    handle.remove()
    labels = torch.cat(seen)
    frac = float((labels == 10).float().mean())
    assert 0.3 < frac < 0.7, frac
    m0 = _method(tmp_path, label_dropout=0.0)
    seen.clear()
    m0.fake_network.class_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    m0.critic_loss(_batch(0, b=8))
    assert not (torch.cat(seen) == 10).any()


def _gan_batch(seed, b=4):
    batch = _batch(seed, b)
    g = torch.Generator().manual_seed(seed + 7)
    batch.real = torch.randn(b, *SHAPE, generator=g).clamp(-1, 1)
    batch.real_labels = torch.randint(0, 10, (b,), generator=g)
    return batch


def test_record_discriminator_trains_the_head_in_stage_1_only_when_asked(tmp_path):
    """record_discriminator: stage 1's critic loss is the recording DSM (the same draws as without it) plus the
    base method's weighted discriminator loss, and the discriminator head gets a gradient; without the option the
    head gets none in stage 1."""
    gan = dict(gan_weight_generator=1.0, gan_weight_discriminator=0.5)
    on = _method(tmp_path / "on", record_discriminator=True, **gan)
    off = _method(tmp_path / "off", **gan)
    for m in (on, off):
        m.begin_generator_step(0)
        assert m.stage == 1 and not m.trains_generator
    out_on, out_off = on.critic_loss(_gan_batch(3)), off.critic_loss(_gan_batch(3))
    assert torch.equal(out_on["dsm"], out_off["dsm"])  # the recording draws come first, unchanged
    assert torch.allclose(out_on["loss"], out_on["dsm"] + 0.5 * out_on["disc"])
    assert "disc" not in out_off and torch.equal(out_off["loss"], out_off["dsm"])
    # the discriminator's loss is the base method's, on the same samples and draws
    batch = _gan_batch(3)
    cond, uncond = on._conditions(batch.labels)
    x0 = on.student_module(batch.noise, cond, batch.generator).detach()
    on.dsm_loss(x0, cond, uncond, batch.generator)  # replay the recording draws before the discriminator's
    expected, _ = on.discriminator_loss(x0, cond, batch)
    assert torch.allclose(out_on["loss"] - out_on["dsm"], expected)
    out_on["loss"].backward()
    out_off["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in on.discriminator.parameters())
    assert all(p.grad is None for p in off.discriminator.parameters())
    assert all(p.grad is None for p in on._student_params)  # G_0 stays frozen
    with pytest.raises(ValueError, match="record_discriminator: true needs the GAN term"):
        DisBackConfig(record_discriminator=True, gan_weight_generator=0.0, gan_weight_discriminator=0.0, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="record_discriminator must be true or false"):
        DisBackConfig(record_discriminator="yes", output_dir=str(tmp_path))


def _trainer(out, max_steps, resume=None):
    from fastgen.training.trainer import DistillTrainer

    config = DistillConfig(output_dir=str(out), method="disback", teacher="builtin:digits", train_batch_size=4,
                           max_train_steps=max_steps, critic_steps_per_generator_step=1, checkpointing_steps=9,
                           learning_rate=1e-3, ema_decay=0.9, logging_steps=1, report_to="none", progress=False,
                           mixed_precision="no", seed=3, resume_from_checkpoint=resume)
    return DistillTrainer(config, method=_method(out), sample_shape=SHAPE, num_classes=10)


def test_resume_mid_path_continues_at_the_same_node(tmp_path):
    """Uninterrupted 12 steps == 9 steps, checkpoint, fresh process state, resume to 12 (the checkpoint is on node 1)."""
    from fastgen.training.checkpoint import network_state_dict

    a = _trainer(tmp_path / "a", 12)
    a.train()
    assert a.method.visited == [2, 1, 0]
    # stage 1 has no generator update: neither the generator's optimiser nor the EMA counts its 6 steps, so the
    # EMA's decay warm-up starts with stage 2 as the base method's does
    assert a.ema.optimization_step == 12 - NODES * RECORD
    gen_params = a.params["generator"]
    assert all(a.optimizers["generator"].optimizer.state[p]["step"] == 12 - NODES * RECORD for p in gen_params)
    b1 = _trainer(tmp_path / "b", 9)
    b1.train()
    assert b1.method.node == 1 and b1.method.visited == [2, 1]
    b2 = _trainer(tmp_path / "b", 12, resume="latest")
    assert b2.method.node is None
    b2._resume()
    assert b2.step == 9 and b2.method.node == 1 and b2.method.visited == [2, 1]
    assert torch.equal(_flat(b2.method.node_network), _flat(b1.method.node_network))
    b2.config.resume_from_checkpoint = None
    b2.train()
    assert b2.method.visited == [2, 1, 0]
    wa = network_state_dict(tmp_path / "a" / "checkpoint-12" / "student_ema")
    wb = network_state_dict(tmp_path / "b" / "checkpoint-12" / "student_ema")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert b2.ema.optimization_step == a.ema.optimization_step
    log = [line for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 12


def test_plateau_advance_leaves_a_node_after_patience_stale_evaluations_or_the_interval(tmp_path):
    """advance="plateau": a node (1..N-1) is left once `plateau_patience` evaluations in a row fail to beat its
    best FID by the relative tolerance, at the latest after `interval` steps; node 0 is kept to the end."""
    m = _method(tmp_path, advance="plateau", interval=6, plateau_patience=2, plateau_tolerance=0.1)
    fids = {8: 10.0, 9: 8.0, 10: 7.5, 11: 7.4, 13: 5.0, 14: 4.0, 15: 3.0, 16: 2.0, 17: 1.5, 18: 9.0, 19: 9.0}
    nodes = []
    for step in range(22):
        m.begin_generator_step(step)
        nodes.append(m.node)
        if step + 1 in fids:
            m.observe_evaluation(step + 1, {"fid": fids[step + 1]})
    # node 2 from step 6: best 10 -> 8; 7.5 and 7.4 are within 10 % of 8 (stale 1, 2), so node 1 from step 11;
    # it keeps improving by more than 10 % and is left at its interval (step 17); the teacher ignores plateaus
    assert nodes == [None] * 6 + [2] * 5 + [1] * 6 + [0] * 5
    assert m.visited == [2, 1, 0]
    m.observe_evaluation(22, {})  # on the teacher nothing is read
    m2 = _method(tmp_path / "b", advance="plateau", interval=5)
    with pytest.raises(ValueError, match="needs the in-training FID"):
        [m2.begin_generator_step(s) for s in range(7)], m2.observe_evaluation(7, {"accuracy": 1.0})
    m3 = _method(tmp_path / "c", interval=5)  # advance="interval" reads no evaluation
    for step in range(12):
        m3.begin_generator_step(step)
        m3.observe_evaluation(step + 1, {"fid": 1.0})
    assert m3.node == 1 and m3.stale == 0


def _plateau_trainer(out, max_steps, monkeypatch, resume=None):
    import fastgen.training.trainer as trainer_module
    from fastgen.training.trainer import DistillTrainer

    fids = {7: 10.0, 8: 9.0, 9: 9.5, 10: 9.6, 11: 8.0, 12: 7.0, 13: 6.0, 14: 5.0, 15: 4.0}
    holder = {}
    monkeypatch.setattr(trainer_module, "evaluate_samples",
                        lambda images, labels, accelerator=None: {"fid": fids.get(holder["t"].step, 1.0)})
    config = DistillConfig(output_dir=str(out), method="disback", teacher="builtin:digits", train_batch_size=4,
                           max_train_steps=max_steps, critic_steps_per_generator_step=1, checkpointing_steps=9,
                           learning_rate=1e-3, ema_decay=0.9, logging_steps=1, report_to="none", progress=False,
                           mixed_precision="no", seed=3, resume_from_checkpoint=resume, validation_steps=1,
                           num_validation_samples=2, validation_batch_size=2)
    trainer = DistillTrainer(config, method=_method(out, advance="plateau", interval=5, plateau_tolerance=0.0),
                             sample_shape=SHAPE, num_classes=10)
    holder["t"] = trainer
    return trainer


def _node_log(folder):
    import json
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [int(r["generator/node"]) for r in log if "generator/node" in r]


def test_plateau_advance_through_the_trainer_resumes_mid_node(tmp_path, monkeypatch):
    """The trainer reports each evaluation to the method; stopped at step 9 with one stale evaluation on node 2
    and resumed, the run switches at the same steps as an uninterrupted one."""
    from fastgen.training.checkpoint import network_state_dict

    a = _plateau_trainer(tmp_path / "a", 16, monkeypatch)
    a.train()
    # node 2 from step 6 (evaluations after steps 7..10: 10, 9, 9.5, 9.6 -> stale 2), node 1 from step 10, left
    # at its interval (step 15), then the teacher
    assert _node_log(tmp_path / "a") == [2] * 4 + [1] * 5 + [0]
    assert a.method.visited == [2, 1, 0]
    b1 = _plateau_trainer(tmp_path / "b", 9, monkeypatch)
    b1.train()
    assert (b1.method.node, b1.method.stale, b1.method.best_fid, b1.method.node_start) == (2, 1, 9.0, 6)
    b2 = _plateau_trainer(tmp_path / "b", 16, monkeypatch, resume="latest")
    b2.train()
    assert _node_log(tmp_path / "b") == _node_log(tmp_path / "a") and b2.method.visited == [2, 1, 0]
    wa = network_state_dict(tmp_path / "a" / "checkpoint-16" / "student_ema")
    wb = network_state_dict(tmp_path / "b" / "checkpoint-16" / "student_ema")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_plateau_advance_needs_evaluations_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="validation_steps: advance 'plateau' reads the in-training FID"):
        DistillConfig(method="disback", advance="plateau", output_dir=str(tmp_path)).validate(check_paths=False)
    with pytest.raises(ValueError, match="teacher: advance 'plateau'"):
        DistillConfig(method="disback", advance="plateau", validation_steps=5, teacher="some/folder",
                      output_dir=str(tmp_path)).validate(check_paths=False)
    with pytest.raises(ValueError, match="advance must be one of"):
        DisBackConfig(advance="fid", output_dir="x")
    with pytest.raises(ValueError, match="plateau_tolerance"):
        DisBackConfig(plateau_tolerance=1.0, output_dir="x")
    with pytest.raises(ValueError, match="plateau_patience"):
        DisBackConfig(plateau_patience=0, output_dir="x")
    DistillConfig(method="disback", advance="plateau", validation_steps=5, output_dir=str(tmp_path)).validate(
        check_paths=False)


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_missing_node_file_and_bad_options(tmp_path):
    m = _method(tmp_path)
    with pytest.raises(CheckpointError, match="node-002"):
        m.load_trainer_state({"disback": {"node": 2, "visited": torch.tensor([2])}, "ratio_ema": m.weighting.state_dict()})
    # a node whose keys do not fit (the reference code's 'fake_unet.' prefix, loaded non-strictly = a silent no-op)
    from safetensors.torch import save_file
    m.node_dir.mkdir(parents=True, exist_ok=True)
    save_file({"fake_unet." + k: v.contiguous() for k, v in m.fake_network.state_dict().items()}, str(m.node_path(1)))
    with pytest.raises(CheckpointError, match="does not fit"):
        m.load_node(1)
    with pytest.raises(ValueError, match="base_method"):
        DisBackConfig(base_method="vsd", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="nodes"):
        DisBackConfig(nodes=0, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="label_dropout"):
        DisBackConfig(label_dropout=1.0, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="output_dir"):
        DisBack(_teacher())
    assert DisBackConfig(base_method="dmd2", divergence="kl", output_dir="x").divergence == "rkl"
    assert DisBackConfig(base_method="fdistill", divergence="kl", output_dir="x").divergence == "kl"
    # through the recipe: method options are checked before any model loads; output_dir is passed on
    cfg = DistillConfig(method="disback", output_dir=str(tmp_path), method_options={"nodes": 2, "interval": 5})
    mc = cfg.method_config()
    assert isinstance(mc, DisBackConfig) and mc.output_dir == str(tmp_path) and mc.nodes == 2
    with pytest.raises(ValueError, match="nodes"):
        DistillConfig(method="disback", method_options={"nodes": -1}).validate(check_paths=False)


# ---------------------------------------------------------------------- 2-D oracle (spec 3.3, stage 1)
def _ring(n_modes=8, radius=2.0):
    import math
    ang = torch.arange(n_modes) * 2 * math.pi / n_modes
    return torch.stack([radius * ang.cos(), radius * ang.sin()], 1)


class UNetToy2D(torch.nn.Module):
    """A 2-D "network" for the oracle test (named UNet* so fastgen's Denoiser calls it ``(x, t, **cond)``):
    epsilon = gate * exact epsilon of a Gaussian-mixture teacher + a zero-initialised MLP(x, t) + a linear map.
    The teacher is gate 1 with the MLP at zero; an affine one-step student is gate 0 with the linear map set."""

    def __init__(self, means, weights, std, width=64):
        super().__init__()
        self.config = {}
        self.std = std
        self.register_buffer("means", means.float())
        self.register_buffer("logw", weights.float().log())
        self.register_buffer("gate", torch.ones(()))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, 2))
        self.lin = torch.nn.Linear(2, 2)
        for p in (*self.mlp[-1].parameters(), *self.lin.parameters()):
            torch.nn.init.zeros_(p)
        ac = DDPMScheduler().alphas_cumprod.float()
        self.register_buffer("alpha", ac.sqrt())
        self.register_buffer("sigma", (1 - ac).sqrt())

    def exact_eps(self, x, t):
        a, s = self.alpha[t][:, None], self.sigma[t][:, None]
        var = a**2 * self.std**2 + s**2
        d = x[:, None, :] - a[:, None, :] * self.means[None]
        resp = (self.logw[None] - (d**2).sum(-1) / (2 * var)).softmax(-1)
        return s * (resp[..., None] * d).sum(1) / var  # -sigma * score

    def forward(self, x, t, return_dict=False, **kwargs):
        t = t.long()
        freqs = 3.0 * 2.0 ** torch.arange(4, device=x.device)
        tf = t.float()[:, None] / 1000 * freqs
        emb = torch.cat([x, tf.sin(), tf.cos()], 1)
        return (self.gate * self.exact_eps(x, t) + self.mlp(emb) + self.lin(x),)


def test_2d_oracle_stage1_nodes_approach_the_initial_students_score(tmp_path):
    """Spec 3.3 test 2: DSM on a Gaussian initial student G_0 = N(m, s^2 I) far from an 8-mode ring teacher; the
    epsilon-distance of node k to the exact noised score of G_0 shrinks monotonically from the teacher (node 0) to
    node N, and the DSM loss falls."""
    from safetensors.torch import load_file
    from fastgen.schedule import NoiseSchedule

    torch.manual_seed(0)
    net = UNetToy2D(_ring(), torch.tensor([3, 1, 3, 1, 3, 1, 3, 1.0]) / 16, 0.15)
    teacher = Denoiser(net, NoiseSchedule.from_scheduler_config(DDPMScheduler()), "epsilon")
    mean, scale, t_star = torch.tensor([4.0, -3.0]), 0.5, 700
    m = DisBack(teacher, nodes=4, record_interval=20, interval=10, output_dir=str(tmp_path), label_dropout=0.0,
                gan_weight_generator=0.0, gan_weight_discriminator=0.0, student_timesteps=[t_star])
    student = m.student_module.network
    a, s = float(net.alpha[t_star]), float(net.sigma[t_star])
    with torch.no_grad():  # x0 = G_0(z) = mean + scale * z: epsilon = c z + d at t*
        student.gate.zero_()
        student.lin.weight.copy_(torch.eye(2) * (1 - a * scale) / s)
        student.lin.bias.copy_(-a * mean / s)
    x = m.student_module(torch.randn(4000, 2), {}, None)
    assert torch.allclose(x.mean(0), mean, atol=0.05) and torch.allclose(x.std(0), torch.full((2,), scale), atol=0.03)
    opt = torch.optim.AdamW(m.optimizer_groups()["critic"], lr=2e-3, weight_decay=0.0)
    losses = []
    for step in range(81):
        m.begin_generator_step(step)
        for k in range(2 if step < 80 else 0):
            g = torch.Generator().manual_seed(1000 * step + k)
            batch = Batch(labels={}, noise=torch.randn(256, 2, generator=g), real=None,
                          generator=torch.Generator().manual_seed(1000 * step + k + 1))
            out = m.critic_loss(batch)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out["dsm"]))
    assert m.stage == 2 and m.visited == [3]
    g = torch.Generator().manual_seed(5)
    t = torch.randint(20, 981, (4096,), generator=g)
    at, st = net.alpha[t][:, None], net.sigma[t][:, None]
    x_t = at * (mean + scale * torch.randn(4096, 2, generator=g)) + st * torch.randn(4096, 2, generator=g)
    eps_q = st * (x_t - at * mean) / (at**2 * scale**2 + st**2)  # exact epsilon of the noised G_0
    probe = m.node_network
    dists = []
    for k in range(5):
        probe.load_state_dict(net.state_dict() if k == 0 else load_file(str(m.node_path(k))))
        with torch.no_grad():
            dists.append(float(((probe(x_t, t)[0] - eps_q) ** 2).sum(1).mean()))
    assert all(b < a for a, b in zip(dists, dists[1:])), dists
    assert sum(losses[-20:]) < 0.2 * sum(losses[:20]), (losses[:3], losses[-3:])
    # known-good run: [12.32, 1.33, 0.59, 0.47, 0.40]
    assert abs(dists[0] - 12.32) < 0.05 and dists[4] < 0.6, dists


# ---------------------------------------------------------------------- 2-D oracle (spec 3.3, stage 2)
_RING_W = torch.tensor([3, 1, 3, 1, 3, 1, 3, 1.0]) / 16
_G0_MEAN, _G0_SCALE, _T_STAR = torch.tensor([4.0, -3.0]), 0.5, 700


def _sliced_w2(x, y, n_proj=64):
    d = torch.randn(2, n_proj, generator=torch.Generator().manual_seed(7))
    d = d / d.norm(dim=0)
    return float((((x @ d).sort(0).values - (y @ d).sort(0).values) ** 2).mean().sqrt())


def _oracle_curve(tmp_path, disback: bool, updates=400, every=10):
    """Sliced W2 to the ring teacher's samples of a one-step MLP generator started as one blob N((4, -3), 0.5^2)
    far from the ring, every ``every`` generator updates: plain DMD (fake score from the teacher) or DisBack
    (5 nodes of 20 recording steps, then nodes 4..1 for 5 updates each, then the teacher). Same init, same
    batches, AdamW on the generator (5e-4) and the fake score (2e-3), 2 critic updates per generator update."""
    from fastgen.schedule import NoiseSchedule
    from fastgen.training.dmd2 import DMD2

    torch.manual_seed(0)
    net = UNetToy2D(_ring(), _RING_W, 0.15)
    teacher = Denoiser(net, NoiseSchedule.from_scheduler_config(DDPMScheduler()), "epsilon")
    common = dict(gan_weight_generator=0.0, gan_weight_discriminator=0.0, student_timesteps=[_T_STAR])
    if disback:
        m = DisBack(teacher, nodes=5, record_interval=20, interval=5, output_dir=str(tmp_path), label_dropout=0.0,
                    **common)
        shift = m.config.recording_steps
    else:
        m, shift = DMD2(teacher, **common), 0
    student = m.student_module.network
    a, s = float(net.alpha[_T_STAR]), float(net.sigma[_T_STAR])
    with torch.no_grad():  # G_0(z) = mean + scale * z
        student.gate.zero_()
        student.lin.weight.copy_(torch.eye(2) * (1 - a * _G0_SCALE) / s)
        student.lin.bias.copy_(-a * _G0_MEAN / s)
    groups = m.optimizer_groups()
    opt_g = torch.optim.AdamW(groups["generator"], lr=5e-4, weight_decay=0.0)
    opt_c = torch.optim.AdamW([p for k, v in groups.items() if k != "generator" for p in v], lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(11)
    target = _ring()[torch.multinomial(_RING_W, 2000, replacement=True, generator=g)] + 0.15 * torch.randn(2000, 2, generator=g)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        return Batch(labels={}, noise=torch.randn(256, 2, generator=g), real=None,
                     generator=torch.Generator().manual_seed(seed + 1))

    curve = {}
    for step in range(shift + updates + 1):
        m.begin_generator_step(step)
        u = step - shift
        if u >= 0 and u % every == 0:
            with torch.no_grad():
                curve[u] = _sliced_w2(m.student_module(z, {}, None), target)
        if u == updates:
            break
        for k in range(2):
            m.critic_loss(batch(1000 * step + k))["loss"].backward()
            opt_c.step()
            opt_c.zero_grad(set_to_none=True)
        if u >= 0:
            m.generator_loss(batch(1000 * step + 500))["loss"].backward()
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
    if disback:
        assert m.visited == [4, 3, 2, 1, 0]
    early = sum(v for u, v in curve.items() if 10 <= u <= 150) / 15
    late = sum(v for u, v in curve.items() if u >= 300) / 11
    return early, late


def test_2d_oracle_stage2_disback_is_no_slower_early_and_better_at_the_end_than_dmd(tmp_path):
    """Spec 3.3 test 3: DisBack (5 nodes) vs plain DMD from the same far-away initial generator, sliced W2 to the
    teacher's samples averaged over updates 10..150 (early) and 300..400 (end). Measured (known-good run): early
    DisBack 1.56 vs DMD 1.54 (equal; with 10 updates per node DisBack was slower early, 1.87: on this analytic
    teacher the path does not speed up the start, the fake score's warm start does), end 0.51 vs 0.85 (DMD keeps
    oscillating between mode sets, DisBack settles)."""
    dmd_early, dmd_late = _oracle_curve(tmp_path / "dmd", disback=False)
    db_early, db_late = _oracle_curve(tmp_path / "disback", disback=True)
    assert db_early <= 1.05 * dmd_early, (db_early, dmd_early)
    assert db_late <= 0.75 * dmd_late, (db_late, dmd_late)
    # known-good run
    assert abs(dmd_early - 1.541) < 0.02 and abs(dmd_late - 0.850) < 0.02, (dmd_early, dmd_late)
    assert abs(db_early - 1.561) < 0.02 and abs(db_late - 0.510) < 0.02, (db_early, db_late)

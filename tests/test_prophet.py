"""Prophet early commit (fastgen.prophet): exact special cases against the stock diffusers scheduler, exact NFE
counts, per-row decisions, config round trips and input validation. Runs on CPU with the built-in arith-dlm model."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import BlockRefinementScheduler, LLaDA2Pipeline  # noqa: E402

import fastgen  # noqa: E402
from fastgen.prophet import (  # noqa: E402
    NFECounter,
    ProphetScheduler,
    answer_start_from_constraints,
    arith_extract_answer,
    arith_problems,
    load_builtin_dlm,
    mean_gap,
    phase_threshold,
    prophet_generate,
    top2_gap,
    validate_thresholds,
)

INF = float("inf")
# Same token length (12), so they batch without padding.
PROMPTS = ["What is 123+456? ", "What is 999+111? ", "What is 505+250? "]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from threads, and on a busy CPU extra threads cost 10x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def parts():
    pipe = load_builtin_dlm(fastgen.builtin_path("arith-dlm"), prophet=False)
    return pipe.model, pipe.tokenizer


def make_pipe(parts, scheduler):
    pipe = LLaDA2Pipeline(model=parts[0], scheduler=scheduler, tokenizer=parts[1])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prophet(tau, **kwargs):
    return ProphetScheduler(early_threshold=tau, mid_threshold=tau, late_threshold=tau, **kwargs)


def generate(pipe, prompts, seed=0, **kwargs):
    call = dict(gen_length=32, block_length=8, num_inference_steps=4, use_chat_template=False, output_type="seq",
                eos_early_stop=False, threshold=1.0, editing_threshold=None)
    call.update(kwargs)
    with NFECounter(pipe.model) as nfe:
        out = pipe(prompt=prompts, generator=torch.Generator().manual_seed(seed), **call)
    return out.sequences, nfe.count


def expected_stock_nfe(prompt_len, gen_length, block_length, steps):
    """Forward passes of the stock pipeline with pure top-k commits and editing off, from its loop structure."""
    total = -(-(prompt_len + gen_length) // block_length) * block_length
    quota = BlockRefinementScheduler().get_num_transfer_tokens(block_length, steps).cumsum(0).tolist()
    nfe = 0
    for start in range((prompt_len // block_length) * block_length, total, block_length):
        masks = block_length - max(0, min(prompt_len - start, block_length))  # gen positions + masked tail
        k = next(i + 1 for i, q in enumerate(quota) if q >= masks)
        nfe += k + (1 if k < steps else 0)  # the stock loop pays one more forward when a block empties early
    return nfe


# --- criterion ------------------------------------------------------------------------------------------------------


def test_gap_is_logprob_gap_and_empty_set_never_fires():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)) * 4
    logp = torch.log_softmax(logits, dim=-1).topk(2, dim=-1).values
    torch.testing.assert_close(top2_gap(logits), logp[..., 0] - logp[..., 1])
    monitor = torch.tensor([[True, False, True, False, False], [False] * 5])
    g = mean_gap(logits, monitor)
    torch.testing.assert_close(g[0], top2_gap(logits)[0, [0, 2]].mean())
    assert math.isnan(g[1].item()) and not bool(g[1] >= -INF)


def test_phase_boundaries_one_based():
    taus = [phase_threshold(step / 100) for step in range(1, 101)]  # 1-based step / total, as the reference code
    assert taus[31] == 7.5 and taus[32] == 5.0  # step 32 early, step 33 (progress 0.33) mid
    assert taus[65] == 5.0 and taus[66] == 2.5  # step 66 mid, step 67 (progress 0.67) late


def _block_logits(gaps, token=5, vocab=12):
    """[rows, positions, vocab] logits whose argmax is ``token`` with the given top-2 gaps."""
    gaps = torch.as_tensor(gaps, dtype=torch.float32)
    logits = torch.zeros(*gaps.shape, vocab)
    logits[..., token] = gaps
    return logits


def test_scheduler_uses_one_based_progress():
    sched = ProphetScheduler()  # 7.5 / 5.0 / 2.5
    sched.set_timesteps(4, block_length=8)
    sample = torch.full((1, 8), 1, dtype=torch.long)  # mask id 1
    logits = _block_logits(torch.full((1, 8), 6.0))  # between mid (5.0) and early (7.5)
    out = sched.step(logits, 0, sample, mask_token_id=1, threshold=1.0)  # progress 1/4: early -> no trigger
    assert int(out.transfer_index.sum()) == 2 and sched.fired_at == [None]
    out = sched.step(logits, 1, out.prev_sample, mask_token_id=1, threshold=1.0)  # progress 2/4: mid -> trigger
    assert bool(out.transfer_index.sum() == 6) and not bool((out.prev_sample == 1).any())
    assert sched.fired_at == [2]


def test_per_row_decisions_match_stock_for_rows_that_do_not_fire():
    sample = torch.full((2, 8), 1, dtype=torch.long)
    logits = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(1))
    logits[0, :, 5] = 30.0  # row 0: gap far above 7.5
    sched, stock = ProphetScheduler(), BlockRefinementScheduler()
    for s in (sched, stock):
        s.set_timesteps(4, block_length=8)
    out = sched.step(logits, 0, sample, mask_token_id=1, threshold=1.0)
    ref = stock.step(logits, 0, sample, mask_token_id=1, threshold=1.0)
    assert torch.equal(out.prev_sample[0], torch.full((8,), 5))  # everything committed to the argmax
    assert bool(out.transfer_index[0].all())
    assert torch.equal(out.prev_sample[1], ref.prev_sample[1])  # stock rule, 2 commits
    assert torch.equal(out.transfer_index[1], ref.transfer_index[1]) and int(ref.transfer_index[1].sum()) == 2
    assert sched.fired_at == [1, None]


def test_answer_span_is_mapped_through_the_prompt_offset():
    prompt_mask = torch.tensor([True, True] + [False] * 6)  # 2 prompt tokens in the first generated block
    sample = torch.tensor([[7, 7] + [1] * 6])
    gaps = torch.full((1, 8), 0.1)
    gaps[0, 3] = 20.0  # generation position 1
    logits = _block_logits(gaps)
    default = ProphetScheduler()
    default.set_timesteps(4, block_length=8)
    default.step(logits, 0, sample, mask_token_id=1, prompt_mask=prompt_mask, threshold=1.0)
    assert default.fired_at == [None]  # mean over the 6 masks is ~3.4 < 7.5
    span = ProphetScheduler(answer_start=1, answer_length=1)
    span.set_timesteps(4, block_length=8)
    out = span.step(logits, 0, sample, mask_token_id=1, prompt_mask=prompt_mask, threshold=1.0)
    assert span.fired_at == [1] and not bool((out.prev_sample == 1).any())


def test_commit_later_blocks_all_in():
    for flag, expected in ((False, 2), (True, 8)):
        sched = ProphetScheduler(commit_later_blocks=flag)
        sched.set_timesteps(4, block_length=8)
        sample = torch.full((1, 8), 1, dtype=torch.long)
        sched.step(_block_logits(torch.full((1, 8), 20.0)), 0, sample, mask_token_id=1, threshold=1.0)  # fires
        out = sched.step(_block_logits(torch.full((1, 8), 0.1)), 0, sample, mask_token_id=1, threshold=1.0)
        assert int(out.transfer_index.sum()) == expected  # next block: all in at its first step only with the flag


# --- special cases on the built-in model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(threshold=1.0),  # pure top-k (LLaDA low-confidence remasking)
        dict(threshold=0.7, block_length=16, num_inference_steps=8),  # confident tokens commit early
        dict(threshold=0.9, temperature=0.8, sampling_method="multinomial"),  # same random draws
        dict(threshold=0.7, editing_threshold=0.5, max_post_steps=2),  # editing passes
    ],
)
def test_plus_inf_is_token_and_nfe_identical_to_stock(parts, kwargs):
    stock_seq, stock_nfe = generate(make_pipe(parts, BlockRefinementScheduler()), PROMPTS, **kwargs)
    seq, nfe = generate(make_pipe(parts, prophet(INF)), PROMPTS, **kwargs)
    assert torch.equal(seq, stock_seq) and nfe == stock_nfe
    # stop_finished_blocks=True skips the stock's useless post-block forwards; at temperature > 0 that also skips
    # their random draws, so only greedy decoding stays token-identical
    seq, nfe = generate(make_pipe(parts, prophet(INF, stop_finished_blocks=True)), PROMPTS, **kwargs)
    assert nfe <= stock_nfe
    if kwargs.get("temperature", 0.0) == 0.0:
        assert torch.equal(seq, stock_seq)


def test_nfe_counts_exact(parts):
    prompt_len = len(parts[1](PROMPTS[0]).input_ids)
    expected = expected_stock_nfe(prompt_len, 32, 8, 4)
    _, nfe = generate(make_pipe(parts, BlockRefinementScheduler()), PROMPTS[:1])
    assert nfe == expected
    _, nfe = generate(make_pipe(parts, prophet(INF)), PROMPTS[:1])
    assert nfe == expected
    # the first generated block holds prompt tokens, so it empties early: its post-block forward is skipped
    _, nfe = generate(make_pipe(parts, prophet(INF, stop_finished_blocks=True)), PROMPTS[:1])
    assert nfe == expected - 1
    # -inf: every generated block is committed by its first forward, with no post-block forward
    n_blocks = -(-(prompt_len + 32) // 8) - prompt_len // 8
    _, nfe = generate(make_pipe(parts, prophet(-INF)), PROMPTS[:1])
    assert nfe == n_blocks


def test_minus_inf_fires_at_first_step_with_first_forward_argmax(parts):
    model, tok = parts
    pipe = make_pipe(parts, prophet(-INF))
    seq, nfe = generate(pipe, PROMPTS[:2], block_length=16, num_inference_steps=8)
    assert pipe.scheduler.fired_at == [1, 1] and pipe.scheduler.fired_block == [0, 0]
    # replay: each block equals the argmax of one forward over the prompt and the earlier blocks
    ids = tok(PROMPTS[:2], return_tensors="pt").input_ids
    p = ids.shape[1]
    total = -(-(p + 32) // 16) * 16
    x = torch.full((2, total), tok.mask_token_id)
    x[:, :p] = ids
    attn = torch.zeros_like(x)
    attn[:, : p + 32] = 1
    with torch.no_grad():
        for end in range((p // 16 + 1) * 16, total + 1, 16):
            logits = model(x[:, :end], attention_mask=attn[:, :end], position_ids=torch.arange(end)[None]).logits
            window = x[:, end - 16: end]
            window[:] = torch.where(window == tok.mask_token_id, logits[:, -16:].argmax(-1), window)
    assert torch.equal(seq, x[:, p: p + 32])
    assert nfe == total // 16 - p // 16


def test_batch_rows_decide_independently(parts):
    pipe = make_pipe(parts, ProphetScheduler())
    batch_seq, _ = generate(pipe, PROMPTS, block_length=32, num_inference_steps=32)
    batch_fired = list(pipe.scheduler.fired_at)
    for i, prompt in enumerate(PROMPTS):
        seq, _ = generate(pipe, [prompt], block_length=32, num_inference_steps=32)
        assert torch.equal(seq[0], batch_seq[i])
        assert pipe.scheduler.fired_at[0] == batch_fired[i]


# --- generic full-sequence loop -------------------------------------------------------------------------------------


def test_generic_loop_special_cases(parts):
    model, tok = parts
    ids = tok(PROMPTS[:2], return_tensors="pt").input_ids
    kw = dict(mask_token_id=tok.mask_token_id, gen_length=16, block_length=8, steps=8)
    base = prophet_generate(model, ids, prophet=False, **kw)
    never = prophet_generate(model, ids, thresholds=(INF, INF, INF), **kw)
    assert torch.equal(base.sequences, never.sequences) and base.nfe == never.nfe == 8
    assert never.fired_at == [None, None]
    first = prophet_generate(model, ids, thresholds=(-INF, -INF, -INF), **kw)
    assert first.nfe == 1 and first.fired_at == [1, 1] and first.nfe_per_row == [1, 1]
    x = torch.cat([ids, torch.full((2, 16), tok.mask_token_id)], dim=1)
    with torch.no_grad():
        assert torch.equal(first.sequences[:, ids.shape[1]:], model(x).logits[:, ids.shape[1]:].argmax(-1))


def test_generic_loop_reimposes_constraints(parts):
    model, tok = parts
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    the = tok.convert_tokens_to_ids("The")
    out = prophet_generate(model, ids, mask_token_id=tok.mask_token_id, gen_length=16, block_length=16, steps=16,
                           constraints={0: the, 5: the})
    assert int(out.sequences[0, ids.shape[1]]) == the and int(out.sequences[0, ids.shape[1] + 5]) == the
    assert answer_start_from_constraints({200: 1, 201: 2, 202: 3}) == 204


# --- serialisation --------------------------------------------------------------------------------------------------


def test_config_save_load_round_trip(tmp_path, parts):
    sched = ProphetScheduler(block_length=16, early_threshold=INF, mid_threshold=3.0, late_threshold=-INF,
                             answer_start=4, commit_later_blocks=True, progress_mode="block")
    sched.save_pretrained(tmp_path / "sched")
    loaded = ProphetScheduler.from_pretrained(tmp_path / "sched")
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    swapped = ProphetScheduler.from_config(BlockRefinementScheduler(block_length=8).config)
    assert swapped.config.block_length == 8 and swapped.thresholds == (7.5, 5.0, 2.5)

    pipe = make_pipe(parts, ProphetScheduler(block_length=8, early_threshold=9.0))
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["scheduler"] == ["fastgen.prophet", "ProphetScheduler"]
    reloaded = LLaDA2Pipeline.from_pretrained(tmp_path / "pipe", tokenizer=parts[1])
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.scheduler, ProphetScheduler)
    assert public(reloaded.scheduler.config) == public(pipe.scheduler.config)
    assert torch.equal(generate(reloaded, PROMPTS[:1])[0], generate(pipe, PROMPTS[:1])[0])


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_errors(parts):
    model, tok = parts
    with pytest.raises(ValueError, match="thresholds"):
        ProphetScheduler(early_threshold=2.5, mid_threshold=5.0, late_threshold=7.5)
    with pytest.raises(ValueError, match="thresholds"):
        validate_thresholds([7.5, float("nan"), 2.5])
    with pytest.raises(ValueError, match="progress_mode"):
        ProphetScheduler(progress_mode="sometimes")
    with pytest.raises(ValueError, match="set_total_steps"):
        ProphetScheduler(progress_mode="global").set_timesteps(4)
    sched = ProphetScheduler()
    sched.set_timesteps(4, block_length=8)
    with pytest.raises(ValueError, match="mask_token_id"):
        sched.step(torch.zeros(1, 8, 12), 0, torch.zeros(1, 8, dtype=torch.long), mask_token_id=None)
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    with pytest.raises(ValueError, match="mask_token_id"):
        prophet_generate(model, ids, mask_token_id=None, gen_length=16, block_length=8, steps=8)
    with pytest.raises(ValueError, match="gen_length must be a multiple of block_length"):
        prophet_generate(model, ids, mask_token_id=1, gen_length=30, block_length=8, steps=8)
    with pytest.raises(ValueError, match="thresholds"):
        prophet_generate(model, ids, mask_token_id=1, gen_length=16, block_length=8, steps=8, thresholds=(1, 2, 3))
    with pytest.raises(ValueError, match="early_threshold"):
        load_builtin_dlm(fastgen.builtin_path("arith-dlm"), early_treshold=3.0)


def test_cli_rejects_bad_arguments_before_loading(capsys):
    from fastgen.cli import main

    assert main(["generate-text", "--gen-length", "30", "--block-length", "8"]) == 2
    assert "--gen-length" in capsys.readouterr().err
    assert main(["generate-text", "--thresholds", "2.5", "5", "7.5"]) == 2
    assert "--thresholds" in capsys.readouterr().err


def test_cli_generate_text_json(capsys):
    from fastgen.cli import main

    assert main(["generate-text", "--prompt", "What is 12+34? ", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"text", "nfe", "steps_used", "step_budget", "fired_at_step"} <= set(record)
    assert 1 <= record["nfe"] <= record["step_budget"] + 2


# --- pinned outputs of the built-in model (the committed arith-dlm; any change to the criterion, the phase rule or
# the commit shows here) ------------------------------------------------------------------------------------------

# (prompt, ProphetScheduler options) -> (decoded generation, forward passes, fired_at, fired_block). gen_length 24,
# block_length 8, 8 steps per block, greedy, pure top-k commits, eos_early_stop on. Mean gaps of the first case:
# 7.82 at step 1 (early, tau 7.5: fires); of the span cases ~2.8-5.0 until step 6 (late phase from progress 0.67,
# tau 2.5: fires at step 6, gaps 3.48 and 5.05).
PINNED_PIPELINE = [
    ("What is 47+58? ", {}, "The answer is 100." + "<|eos|>" * 6, 2, [1], [0]),
    ("What is 47+58? ", {"answer_start": 4}, "The answer is 100." + "<|eos|>" * 6, 9, [6], [0]),
    ("What is 9+86? ", {"answer_start": 4}, "The answer is 95." + "<|eos|>" * 8, 7, [6], [0]),
    ("Which is larger, 312 or 98? ", {}, "The answer is 312." + "<|eos|>" * 2, 2, [1], [0]),
]


@pytest.mark.parametrize("prompt, options, text, nfe, fired_at, fired_block", PINNED_PIPELINE,
                         ids=["add-masked", "add-span", "add2-span", "compare-masked"])
def test_pinned_prophet_pipeline_outputs(parts, prompt, options, text, nfe, fired_at, fired_block):
    pipe = make_pipe(parts, ProphetScheduler(**options))
    seq, count = generate(pipe, [prompt], gen_length=24, block_length=8, num_inference_steps=8, eos_early_stop=True)
    assert parts[1].decode(seq[0]).replace("<|mask|>", "") == text
    assert (count, pipe.scheduler.fired_at, pipe.scheduler.fired_block) == (nfe, fired_at, fired_block)


def test_pinned_prophet_generic_loop_outputs(parts):
    """Two rows firing at different steps: row 1 at step 1 (gap 7.94 >= 7.5), row 0 at step 9 (progress 9/16, mid
    phase, gap 14.0 after 3.03 at step 6); with the answer span row 0 fires at step 6 (5.88 >= 5.0)."""
    model, tok = parts
    ids = tok(["What is 47+58? ", "What is 12+34? "], return_tensors="pt").input_ids
    texts = ["The answer is 100." + "<|eos|>" * 8, "The answer is 44." + "<|eos|>" * 9]
    kw = dict(mask_token_id=tok.mask_token_id, gen_length=16, block_length=8, steps=16)
    for options, nfe, fired_at in (({}, 9, [9, 1]), ({"answer_start": 4}, 6, [6, 1])):
        out = prophet_generate(model, ids, **options, **kw)
        assert tok.batch_decode(out.sequences[:, ids.shape[1]:]) == texts
        assert (out.nfe, out.nfe_per_row, out.fired_at) == (nfe, fired_at, fired_at)


def test_builtin_model_solves_its_task(parts):
    pipe = make_pipe(parts, BlockRefinementScheduler())
    problems = arith_problems(20, split="test", seed=7)
    correct = 0
    for p in problems:
        out = pipe(prompt=p["prompt"], gen_length=24, block_length=8, num_inference_steps=8, threshold=1.0,
                   use_chat_template=False, editing_threshold=None)
        correct += arith_extract_answer(out.texts[0]) == p["answer"]
    assert correct >= 12  # the committed model solves 15 of these 20; an untrained or broken one ~0


# --- fastgen eval prophet: output files ------------------------------------------------------------------------------

FAIR_NFE = 25  # 4 problems at 4 steps/block: the stock 27 less two post-block forwards that change nothing
EVAL_SMALL = ["eval", "prophet", "--n", "4", "--budgets", "4", "--gen-length", "16", "--block-length", "8"]


def _digest(paths):
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_eval_prophet_writes_to_cwd_and_never_overwrites(tmp_path, monkeypatch, capsys):
    from fastgen.cli import main

    results = tmp_path / "benchmarks" / "results"  # a checkout's committed results, run from its root
    results.mkdir(parents=True)
    committed = [results / "prophet.json", results / "prophet.png"]
    for p in committed:
        p.write_bytes(b"committed " + p.name.encode())
    kept = _digest(committed)
    monkeypatch.chdir(tmp_path)

    assert main(EVAL_SMALL) == 0
    assert _digest(committed) == kept
    written = [tmp_path / "prophet.json", tmp_path / "prophet.png"]
    result = json.loads(written[0].read_text())
    assert written[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pinned: 4 held-out problems (seed 0), 4 steps per block; (correct, total forward passes, fired fraction)
    summary = {c["method"]: (c["correct"], c["total_nfe"], c["fired_fraction"]) for c in result["cells"]}
    assert summary == {"baseline": (2, 27, None), "baseline-fair": (2, FAIR_NFE, None), "prophet": (2, 7, 1.0),
                       "prophet-all-in": (2, 7, 1.0), "prophet-answer-span": (2, 10, 1.0)}
    # the fair baseline decodes the stock tokens (same hash) with fewer forwards; Prophet is compared with both
    cells = {c["method"]: c for c in result["cells"]}
    assert cells["baseline-fair"]["answers_sha256"] == cells["baseline"]["answers_sha256"]
    fair = [c for c in result["comparisons"] if c["method"] == "baseline-fair"]
    assert len(fair) == 1 and fair[0]["identical_answers"] is True and fair[0]["nfe_reduction"] == round(27 / FAIR_NFE, 3)
    vs_fair = {c["method"]: c["nfe_reduction"] for c in result["comparisons"] if c["baseline"] == "baseline-fair"}
    assert vs_fair == {"prophet": round(FAIR_NFE / 7, 3), "prophet-all-in": round(FAIR_NFE / 7, 3),
                       "prophet-answer-span": round(FAIR_NFE / 10, 3)}
    first = _digest(written)
    capsys.readouterr()

    for extra in ([], ["--out", "benchmarks/results/prophet.json"], ["--out", "benchmarks/results"]):
        assert main(EVAL_SMALL + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--overwrite must be set to replace the existing file" in err, err
        assert "prophet.json" in err
        assert _digest(written) == first and _digest(committed) == kept
    assert main(EVAL_SMALL + ["--out", "runs", "--overwrite"]) == 2  # neither a .json file nor a folder
    assert "--out must be a .json file" in capsys.readouterr().err

    # --resume continues the file: measured cells are kept as they are, only new ones run
    assert main(EVAL_SMALL + ["--budgets", "4", "2", "--resume"]) == 0
    resumed = json.loads(written[0].read_text())
    assert resumed["cells"][:5] == result["cells"] and len(resumed["cells"]) == 10
    assert {c["steps_per_block"] for c in resumed["cells"][5:]} == {2} and len(resumed["comparisons"]) == 14
    first = _digest(written)
    capsys.readouterr()
    assert main(EVAL_SMALL + ["--n", "3", "--resume"]) == 2  # other options: refused, file untouched
    assert "resume: prophet.json was written with other options (n: 4 there, 3 now" in capsys.readouterr().err
    assert _digest(written) == first

    assert main(EVAL_SMALL + ["--seed", "1", "--overwrite"]) == 0
    assert json.loads(written[0].read_text())["config"]["seed"] == 1
    assert _digest(committed) == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benchmarks", "prophet.json", "prophet.png"]  # no temp


def test_eval_prophet_refuses_bad_outputs_before_loading(tmp_path, monkeypatch, capsys):
    import fastgen.prophet.text as text
    from fastgen.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although the command had to be refused")

    monkeypatch.setattr(text, "load_builtin_dlm", no_loading)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    package = os.path.dirname(fastgen.__file__)
    cases = [
        (["--out", os.path.join(package, "prophet.json")], "inside the installed fastgen package"),
        (["--out", "a_file/prophet.json"], "below a file"),
        (["--n", "0"], "--n must be"),
        (["--budgets", "0"], "--budgets"),
        (["--thresholds", "1", "2", "3"], "--thresholds"),
        (["--gen-length", "12"], "--gen-length must be a multiple of block_length"),
        (["--methods", "prophet", "magic"], "--methods must be distinct names among"),
        (["--overwrite", "--resume"], "overwrite and resume exclude each other"),
    ]
    for extra, message in cases:
        assert main(EVAL_SMALL + extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    for extra, message in ((["--gen-length", "30"], "--gen-length"), (["--steps", "0"], "--steps"),
                           (["--temperature", "-1"], "--temperature"), (["--model", "no/such/dir"], "--model")):
        assert main(["generate-text", *extra]) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    assert not os.path.exists(os.path.join(package, "prophet.json"))


def test_benchmark_output_paths(tmp_path):
    from fastgen.prophet.benchmark import benchmark_output_paths

    assert benchmark_output_paths(tmp_path) == (tmp_path / "prophet.json", tmp_path / "prophet.png")
    assert benchmark_output_paths(tmp_path / "new" / "r.json")[1] == tmp_path / "new" / "r.png"
    (tmp_path / "r.png").write_text("x")  # the plot alone exists: refused too
    with pytest.raises(FileExistsError, match="overwrite must be set to replace the existing file .*r.png"):
        benchmark_output_paths(tmp_path / "r.json")
    assert benchmark_output_paths(tmp_path / "r.json", overwrite=True)[0] == tmp_path / "r.json"
    with pytest.raises(ValueError, match="out must be a .json file or an existing folder"):
        benchmark_output_paths(tmp_path / "r.txt")


def test_package_loads_lazily_and_builtin_registry_resolves():
    import subprocess
    import sys

    # the CLI's option dataclasses live in fastgen.prophet.text/benchmark: `fastgen --help` must not pay for torch
    code = "import sys, fastgen.cli.text; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    pipe = fastgen.load_builtin("arith-dlm")  # registry entry "fastgen.prophet:load_builtin_dlm"
    assert isinstance(pipe, LLaDA2Pipeline) and isinstance(pipe.scheduler, ProphetScheduler)
    assert ProphetScheduler.__module__ == "fastgen.prophet"  # the path saved pipelines name (model_index.json)


def test_interleaved_wall_time_side_by_side():
    from fastgen.prophet.benchmark import ProphetBenchmarkConfig, interleaved_wall_time

    config = ProphetBenchmarkConfig(n=4, gen_length=16, block_length=8)
    with pytest.raises(ValueError, match="methods must be names among"):
        interleaved_wall_time(config, steps=4, methods=["baseline", "magic"], n=2)
    with pytest.raises(ValueError, match="n must be in 1..4"):
        interleaved_wall_time(config, steps=4, methods=["baseline"], n=5)
    # the same 4 problems as the eval prophet test above: the same forward counts, the fair baseline's stock tokens
    rows = interleaved_wall_time(config, steps=4, methods=["baseline", "baseline-fair", "prophet"], n=4, repeats=1)
    by = {r["method"]: r for r in rows}
    assert [4 * by[m]["mean_nfe"] for m in ("baseline", "baseline-fair", "prophet")] == [27, FAIR_NFE, 7]
    assert by["baseline-fair"]["answers_sha256"] == by["baseline"]["answers_sha256"]
    assert by["prophet"]["nfe_ratio_vs_baseline-fair"] == round(7 / FAIR_NFE, 4)
    assert by["prophet"]["nfe_ratio_vs_baseline"] == round(7 / 27, 4) and "time_ratio_vs_baseline" not in by["baseline"]
    assert all(r["ms_per_problem"] > 0 and r["time_ratio_vs_baseline-fair"] > 0 for r in rows if r["method"] != "baseline-fair")

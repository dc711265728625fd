"""Kill test for ``fastgen search-schedule`` (issue 14): SIGKILL or Ctrl-C mid-run, resume with the same
options -> the same final records as an uninterrupted run; resume with other options -> refused, state untouched.

The search runs in a subprocess (as a user runs it) with a tiny budget that still goes past the 14 seed
candidates into predictor rounds, so a kill can land in either phase.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTS = ["--nfe", "4", "--budget", "17", "--samples", "12", "--rescore", "1", "--rescore-samples", "12", "--seed", "2",
        "--threads", "1"]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastgen.cli", "search-schedule", *OPTS, *extra, "--out", str(out), "--json"]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    return env


def _records(out: Path) -> list:
    state = json.loads(Path(str(out) + ".state.json").read_text())
    return [(r["round"], r["metric"], json.dumps(r["schedule"], sort_keys=True)) for r in state["records"]]


def _state_len(out: Path) -> int:
    try:
        return len(json.loads(Path(str(out) + ".state.json").read_text())["records"])
    except (OSError, ValueError, KeyError):
        return 0


def _interrupt(out: Path, sig: int, after: int) -> subprocess.CompletedProcess:
    """Start the search, send ``sig`` once the state holds ``after`` records; returns the finished process."""
    # SIG_DFL first: a test run started in the background by a shell inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler (the search would not see the Ctrl-C this test sends).
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=out.parent, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while _state_len(out) < after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the search ended before it could be interrupted: {proc.communicate()}"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, *extra), capture_output=True, text=True, env=_env(), cwd=out.parent, timeout=180)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "s.json"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    return _records(out), json.loads(out.read_text())


def _same_result(out: Path, reference) -> None:
    records, best = reference
    assert _records(out) == records
    mine = json.loads(out.read_text())
    for d in (mine, best):  # wall/cpu times of this run differ
        for k in ("eval_seconds", "cpu_seconds_this_run", "wall_seconds_this_run"):
            d.get("meta", {}).get("search", {}).pop(k, None)
    assert mine == best


def test_sigkill_then_resume_matches_uninterrupted(reference, tmp_path):
    out = tmp_path / "s.json"
    proc = _interrupt(out, signal.SIGKILL, after=15)  # inside the first predictor round
    assert proc.returncode == -signal.SIGKILL
    assert 15 <= _state_len(out) < 17 and not out.exists()
    json.loads(Path(str(out) + ".state.json").read_text())  # the state is whole (atomic writes)
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    _same_result(out, reference)
    assert len(Path(str(out) + ".log.jsonl").read_text().splitlines()) == 17  # no evaluation logged twice


def test_ctrl_c_then_resume_matches_uninterrupted(reference, tmp_path):
    out = tmp_path / "s.json"
    proc = _interrupt(out, signal.SIGINT, after=1)  # among the seed candidates
    assert proc.returncode == 130, proc.stderr
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors["exit_code"] == 130 and "interrupted" in errors["error"]
    assert "Traceback" not in proc.stderr
    kept = _state_len(out)
    assert 1 <= kept < 17
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr
    _same_result(out, reference)


@pytest.mark.parametrize("change", [["--nfe", "5"], ["--seed", "3"], ["--samples", "13"], ["--metric", "rms"]],
                         ids=["nfe", "seed", "samples", "metric"])
def test_resume_with_other_options_is_refused(change, reference, tmp_path):
    out = tmp_path / "s.json"
    state = Path(str(out) + ".state.json")
    state.write_text(json.dumps({"space": {"nfe": 4, "teleport_steps": 0}, "options": {
        "model": "builtin:digits", "metric": "fid", "samples": 12, "reference_steps": 50, "data_mean": "auto",
        "initial": [], "scale": 3.0, "teleport": None, "seed": 2}, "records": []}))
    before = state.read_bytes()
    from fastgen.cli import main

    args = dict(zip(OPTS[::2], OPTS[1::2]))
    args.update(dict(zip(change[::2], change[1::2])))
    argv = ["search-schedule", *[x for kv in args.items() for x in kv], "--out", str(out)]
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    assert "s.json.state.json" in lines[0] and change[0].lstrip("-") in lines[0]
    assert state.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json.state.json"]  # nothing else written

"""Every benchmark script parses its options with the shared harness and answers --help (argparse %-formats
help texts, so a literal '%' in one once crashed --help)."""
import runpy
from pathlib import Path

import pytest

SCRIPTS = sorted(Path(__file__).resolve().parent.parent.glob("benchmarks/*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_help(script, capsys):
    module = runpy.run_path(str(script), run_name="benchmark_under_test")
    with pytest.raises(SystemExit) as exit_info:
        module["main"](["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


def test_distill_benchmarks_join_a_kept_record_and_its_continuation(tmp_path, monkeypatch):
    """``A+B`` sources: a run kept in an earlier record joined with the folder of its resumed continuation,
    in step order, the later source winning a step both hold."""
    import json

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from distill import evaluations

    (tmp_path / "old.json").write_text(json.dumps({"runs": {"routed": {"evaluations": [
        {"step": 200, "fid": 2.0}, {"step": 100, "fid": 3.0}]}}}))
    (tmp_path / "new.json").write_text(json.dumps({"students": {"more": {"evaluations": [
        {"step": 300, "fid": 1.5}, {"step": 200, "fid": 1.9}]}}}))
    name, rows = evaluations(f"record:{tmp_path / 'old.json'}:routed+record:{tmp_path / 'new.json'}:more")
    assert name == "old.json:routed+new.json:more"
    assert [(r["step"], r["fid"]) for r in rows] == [(100, 3.0), (200, 1.9), (300, 1.5)]
    labelled, same = evaluations(f"kept and continued=record:{tmp_path / 'old.json'}:routed+record:{tmp_path / 'new.json'}:more")
    assert labelled == "kept and continued" and same == rows

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
    # a continuation warm-started from another folder logs its minutes from zero: they count on from the
    # earlier source's last evaluation before it; a resume in the same folder already counts on
    (tmp_path / "warm.json").write_text(json.dumps({"runs": {
        "first": {"evaluations": [{"step": 100, "fid": 3.0, "cpu_minutes": 5.0, "wall_minutes": 6.0},
                                  {"step": 200, "fid": 2.0, "cpu_minutes": 10.0, "wall_minutes": 12.0}]},
        "warm": {"evaluations": [{"step": 300, "fid": 1.5, "cpu_minutes": 4.0, "wall_minutes": None}]},
        "same": {"evaluations": [{"step": 300, "fid": 1.5, "cpu_minutes": 14.0, "wall_minutes": 16.0}]}}}))
    warm = tmp_path / "warm.json"
    _, rows = evaluations(f"record:{warm}:first+record:{warm}:warm")
    assert [(r["step"], r["cpu_minutes"], r["wall_minutes"]) for r in rows] == [(100, 5.0, 6.0), (200, 10.0, 12.0),
                                                                                (300, 14.0, None)]
    _, rows = evaluations(f"record:{warm}:first+record:{warm}:same")
    assert rows[-1]["cpu_minutes"] == 14.0 and rows[-1]["wall_minutes"] == 16.0
    (tmp_path / "colon.json").write_text(json.dumps({"runs": {"from builtin:digits-1step": {"evaluations": [
        {"step": 100, "fid": 1.0}]}}}))  # a label may hold ':'
    assert evaluations(f"record:{tmp_path / 'colon.json'}:from builtin:digits-1step")[1] == [{"step": 100, "fid": 1.0}]
    (tmp_path / "plus.json").write_text(json.dumps({"runs": {"regression + DM": {"evaluations": [
        {"step": 100, "fid": 1.0}]}}}))  # ... and ' + ' (only a '+' without spaces joins)
    assert evaluations(f"record:{tmp_path / 'plus.json'}:regression + DM")[1] == [{"step": 100, "fid": 1.0}]
    _, rows = evaluations(f"record:{tmp_path / 'plus.json'}:regression + DM+record:{tmp_path / 'new.json'}:more")
    assert [r["step"] for r in rows] == [100, 200, 300]


def test_card_figures_and_teacher_cells(tmp_path):
    """The model cards' figures table (one row per model, accuracy in percent) and the teacher's cells, taken
    only from a record measured on the card's sample count."""
    import json

    from fastgen.benchmarking import card_figures, teacher_cells

    cell = {"fid": 0.9614, "accuracy": 0.9975, "roughness": 0.10372, "precision": 0.9015, "recall": 0.7}
    text = card_figures({"num_samples": 2000, "hardware": "x"}, [("student", 1, cell), ("teacher", 40.0, cell)])
    assert text.startswith("## Figures\n\n2,000 samples")
    assert text.splitlines()[-2:] == ["| student | 1 | 0.96 | 99.75% | 0.104 | 0.901 | 0.700 |",
                                      "| teacher | 40 | 0.96 | 99.75% | 0.104 | 0.901 | 0.700 |"]
    (tmp_path / "d.json").write_text(json.dumps({"config": {"n": 2000}, "teacher": [cell]}))
    assert teacher_cells(tmp_path / "d.json", 2000) == [cell]
    assert teacher_cells(tmp_path / "d.json", 500) == [] and teacher_cells(tmp_path / "none.json", 2000) == []


def test_fid_noise_scores_a_student_on_disjoint_seed_sets(tmp_path):
    """--model: a distilled student on the disjoint seed sets (its own steps); sets differ, the summary is their
    mean, and a re-run keeps the finished sets."""
    import json
    import statistics

    fid_noise = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "fid_noise.py"),
                               run_name="benchmark_under_test")
    out = tmp_path / "noise.json"
    argv = ["--model", "builtin:digits-1step", "--samples", "40", "--sets", "2", "--batch_size", "40", "--out", str(out)]
    fid_noise["main"](argv)
    data = json.loads(out.read_text())
    assert data["config"]["model"] == "builtin:digits-1step" and "solver" not in data["config"]
    fids = [c["fid"] for c in data["cells"]]
    assert len(fids) == 2 and fids[0] != fids[1]  # disjoint seeds, not the same samples twice
    assert data["mean"] == pytest.approx(statistics.mean(fids))
    assert data["roughness_mean"] == pytest.approx(statistics.mean(c["roughness"] for c in data["cells"]))
    fid_noise["main"](argv[:-4] + ["--sets", "3", "--out", str(out)])
    again = json.loads(out.read_text())
    assert [c["fid"] for c in again["cells"][:2]] == fids and len(again["cells"]) == 3


def test_fid_noise_runs_a_student_on_another_step_list(tmp_path):
    """--timesteps: the same student weights on another step list; its own list reproduces the plain run's
    cells, another list gives other samples, and bad values stop before a model is loaded."""
    import json

    fid_noise = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "fid_noise.py"),
                               run_name="benchmark_under_test")
    base = ["--model", "builtin:digits-1step", "--samples", "40", "--sets", "1", "--batch_size", "40"]
    runs = (("own", []), ("same", ["--timesteps", "500"]), ("two", ["--timesteps", "500,20"]),
            ("ddim", ["--timesteps", "500,20", "--renoise", "ddim"]))
    for name, extra in runs:
        fid_noise["main"](base + extra + ["--out", str(tmp_path / f"{name}.json")])
    cell = {n: json.loads((tmp_path / f"{n}.json").read_text())["cells"][0] for n, _ in runs}
    assert cell["same"]["fid"] == cell["own"]["fid"]
    assert cell["two"]["fid"] != cell["own"]["fid"] and cell["two"]["roughness"] < cell["own"]["roughness"]
    assert cell["ddim"]["fid"] not in (cell["two"]["fid"], cell["own"]["fid"])
    assert json.loads((tmp_path / "two.json").read_text())["config"]["timesteps"] == [500, 20]
    assert json.loads((tmp_path / "ddim.json").read_text())["config"]["renoise"] == "ddim"
    for bad, flag in ((["--timesteps", "500"], "--timesteps"), (base[:2] + ["--timesteps", "500;20"], "--timesteps"),
                      (base[:2] + ["--renoise", "sde"], "--renoise"), (["--renoise", "ddim"], "--renoise")):
        with pytest.raises(SystemExit, match=flag):
            fid_noise["main"](bad + ["--out", str(tmp_path / "bad.json")])


def test_distill_benchmark_headline_figure(tmp_path, monkeypatch):
    """--headline: the main PNG shows the named runs, <out>_all.png every run; a --keep re-run keeps the record's
    headline; a label the record lacks is refused before the teacher is scored."""
    import json

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill

    row = {"step": 100, "fid": 2.0, "roughness": 0.1, "recall": 0.5, "cpu_minutes": 1.0}
    cell = {"teacher": "20 steps CFG", "nfe": 40, "fid": 2.5, "roughness": 0.096, "recall": 0.7}
    out = tmp_path / "d.json"
    out.write_text(json.dumps({"config": {"n": 10, "teacher_scale": 2.0}, "teacher": [cell], "students": {
        name: {"run": name, "best": row, "evaluations": [row, {**row, "step": 200}]} for name in ("a", "b", "c")}}))
    shown = []
    monkeypatch.setattr(distill, "plot", lambda record, path, runs=None: shown.append((path.name, runs)))
    argv = ["--keep", "--n", "10", "--no_heldout", "--out", str(out)]
    distill.main(argv + ["--headline", "c", "a"])
    assert shown == [("d.png", ["c", "a"]), ("d_all.png", None)]
    assert json.loads(out.read_text())["config"]["headline"] == ["c", "a"]
    shown.clear()
    distill.main(argv)  # kept
    assert shown == [("d.png", ["c", "a"]), ("d_all.png", None)]
    monkeypatch.setattr(distill, "teacher_cells", lambda *a: pytest.fail("teacher scored before the check"))
    with pytest.raises(ValueError, match="--headline names runs that are not in the record: \\['z'\\]"):
        distill.main(argv + ["--headline", "a", "z"])
    monkeypatch.undo()
    distill.plot(json.loads(out.read_text()), tmp_path / "p.png", ["a"])  # the real figure, two of three runs
    assert (tmp_path / "p.png").stat().st_size > 0


def test_curve_colours_are_distinct():
    """Every curve of a plot gets its own colour: distinct hues up to 18 curves, tab20 beyond."""
    from matplotlib.colors import to_rgba

    from fastgen.benchmarking import curve_colour, pyplot

    plt = pyplot()
    for count in (3, 11, 18, 20):
        colours = {to_rgba(curve_colour(plt, i, count)) for i in range(count)}
        assert len(colours) == count


def test_benchmark_pipeline_errors_name_what_was_meant(tmp_path):
    """builtin_pipeline: a missing folder is reported as a folder, an unknown bare name as a built-in name."""
    from fastgen.benchmarking import builtin_pipeline

    with pytest.raises(FileNotFoundError, match="nosuch"):
        builtin_pipeline(str(tmp_path / "nosuch" / "student"))
    with pytest.raises(ValueError, match="builtin name must be one of"):
        builtin_pipeline("digitz")


def test_fewstep_refine_matches_the_student_alone_and_runs_the_teacher_after_it(tmp_path):
    """fewstep_refine.py: the student-alone row is fid_noise.py's on the same seeds (same noise, same labels);
    a teacher step after it changes the samples, and CFG on that step changes them again; bad configs stop
    before a model loads."""
    import json

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    refine = runpy.run_path(str(root / "fewstep_refine.py"), run_name="benchmark_under_test")
    fid_noise = runpy.run_path(str(root / "fid_noise.py"), run_name="benchmark_under_test")
    common = ["--model", "builtin:digits-1step", "--samples", "40", "--sets", "1", "--batch_size", "40"]
    refine["main"](common + ["--configs", "500", "500,100", "500,100@2", "--out", str(tmp_path / "r.json")])
    fid_noise["main"](common + ["--out", str(tmp_path / "n.json")])
    cells = {c["config"]: c for c in json.loads((tmp_path / "r.json").read_text())["cells"]}
    assert cells["500"]["fid"] == json.loads((tmp_path / "n.json").read_text())["cells"][0]["fid"]
    assert len({cells[k]["fid"] for k in cells}) == 3
    assert (cells["500,100@2"]["teacher_steps"], cells["500,100@2"]["teacher_cfg"]) == ([100], 2.0)
    assert (tmp_path / "r.png").is_file()
    for bad in ("500;100", "100,500", "500,100@x", "500,100:sde"):
        with pytest.raises(SystemExit, match="--configs"):
            refine["main"](["--model", "/nonexistent", "--configs", bad, "--out", str(tmp_path / "bad.json")])


def test_disback_seed_means_apply_the_one_seed_rule_to_the_mean_curves(tmp_path, monkeypatch):
    """distill_disback_seeds.py: the mean curves average the seeds at each shared update count, the targets are
    distill_disback.compare on them (pinned on the committed t* = 700 records: the recipe's DisBack first reaches
    the base's mean final 5.09 at 375 of 400 updates and ends at 5.24), and a distill_disback record's runs are
    sources for distill.evaluations."""
    import json

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import distill_disback_seeds as seeds
    from distill import evaluations

    a = [{"updates": -25, "fid": 50.0}, {"updates": 0, "fid": 50.0}, {"updates": 25, "fid": 4.0}, {"updates": 50, "fid": 2.0}]
    b = [{"updates": 0, "fid": 50.0}, {"updates": 25, "fid": 6.0}, {"updates": 50, "fid": 4.0}, {"updates": 75, "fid": 1.0}]
    mean = seeds.mean_curve([a, b])
    assert [(r["updates"], r["fid"], r["seeds"]) for r in mean] == [(0, 50.0, 2), (25, 5.0, 2), (50, 3.0, 2)]
    assert abs(mean[1]["fid_std"] - 2 ** 0.5) < 1e-12
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    paths = [str(results / "distill_disback_t700.json")] + [str(results / f"distill_disback_t700_seed{s}.json")
                                                             for s in range(1, 5)]
    group = seeds.group_record("recipe", paths)
    s = group["summary"]
    assert (s["disback_updates_to_base_final_fid"], s["fraction_of_base_updates"]) == (375, 0.938)
    assert round(s["base_final_fid"], 4) == 5.092 and round(s["disback_fid_at_base_final_updates"], 4) == 5.2398
    assert (s["reaches_within_70_percent"], s["ends_no_worse"], s["target_met"]) == (False, False, False)
    assert group["per_seed"] == {"reaches_within_70_percent": 2, "ends_no_worse": 2, "target_met": 1}
    name, rows = evaluations(f"record:{paths[3]}:base")
    assert name == "distill_disback_t700_seed3.json:base" and rows == json.loads(Path(paths[3]).read_text())["base"]
    out = tmp_path / "seeds.json"
    seeds.main(["--out", str(out), "--groups", "recipe=" + ",".join(paths[:2])])
    assert out.with_suffix(".png").is_file() and json.loads(out.read_text())["groups"][0]["per_seed"]["target_met"] == 0
    with pytest.raises(ValueError, match="groups: each group is LABEL=rec.json"):
        seeds.main(["--out", str(out), "--groups", "one=" + paths[0]])

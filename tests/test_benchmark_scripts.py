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

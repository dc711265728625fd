"""Compatibility: ``load_pipeline`` moved to :func:`fastgen.builtin.load_pipeline` (``fastgen sample`` is
``fastgen/cli/sample.py``). Kept while ``fastgen.cli_eval`` and the benchmarks import it from here."""
from .builtin import load_pipeline

__all__ = ["load_pipeline"]

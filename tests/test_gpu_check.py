"""`python -m benchmarks` as a GPU loan meets it, checked without a GPU: against a pytest run that fails."""

from __future__ import annotations

import json
from pathlib import Path


def test_benchmark_tables_are_written_for_a_run_that_failed(tmp_path, monkeypatch):
    """A failing or interrupted benchmark run still leaves the JSON of what ran: the table is made from
    it and the exit status stays the failure's."""
    import pytest

    from benchmarks import __main__ as runner

    def failing_run(args):
        json_path = Path(next(arg for arg in args if arg.startswith("--benchmark-json=")).split("=", 1)[1])
        bench = {"group": "g", "name": "test", "params": {"method": "ours"}, "extra_info": {},
                 "stats": {"median": 0.5, "min": 0.4, "max": 0.6, "rounds": 3}}
        json_path.write_text(json.dumps({"benchmarks": [bench], "machine_info": {}, "datetime": "today"}))
        return 2

    monkeypatch.setattr(runner, "RESULTS", tmp_path)
    monkeypatch.setattr(pytest, "main", failing_run)
    monkeypatch.setattr(runner, "plot", lambda results, path: False)
    assert runner.main(["-k", "nothing"]) == 2
    assert len(list(tmp_path.glob("*.md"))) == 1

"""The README's quickstart runs as printed (a new user pastes it first)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_printed(tmp_path):
    quickstart = README.read_text().split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", quickstart, re.S).group(1)
    assert len(code.strip().splitlines()) <= 5, code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(README.parent)})
    assert done.returncode == 0, done.stderr[-2000:]
    accuracy, sparsity = (float(value) for value in done.stdout.split()[:2])
    assert accuracy > 0.9 and abs(sparsity - 0.9) < 1e-4, done.stdout


def test_benchmark_tables_quote_the_results_file_they_name():
    """Every figure of the README's benchmark tables is a median (ms) of the results file the section names,
    or a ratio of two medians of a benchmark group that holds a median of the same row, as printed (rounded
    to the digits shown)."""
    section = README.read_text().split("### Benchmark results", 1)[1].split("\n## ", 1)[0]
    named = re.search(r"\((benchmarks/results/[^)\s]+)\.\*\)", section).group(1)
    groups: dict[str, list[float]] = {}
    for run in json.loads((README.parent / f"{named}.json").read_text())["benchmarks"]:
        groups.setdefault(run["group"], []).append(run["stats"]["median"] * 1e3)

    def shows(value: float, number: str) -> bool:
        decimals = len(number.split(".")[1]) if "." in number else 0
        return abs(value - float(number)) <= 0.5 * 10.0 ** -decimals + 1e-9

    checked = 0
    for table in re.findall(r"((?:^\|.*\|\n)+)", section, re.M):
        header, _, *rows = table.splitlines()
        columns = [cell.strip() for cell in header.split("|")[1:-1]]
        for row in rows:
            medians, ratios = [], []
            for column, cell in list(zip(columns, row.split("|")[1:-1]))[1:]:  # the first column names the row
                for number, times in re.findall(r"(\d+(?:\.\d+)?)(×?)", cell.replace("*", "")):
                    if column != "shape":
                        (ratios if times or "×" in column or "÷" in column else medians).append(number)
            row_groups = [group for group in groups.values() if any(shows(m, n) for m in group for n in medians)]
            for number in medians:
                assert any(shows(m, number) for group in groups.values() for m in group), (row, number)
            for number in ratios:
                assert any(shows(a / b, number) for group in row_groups for a in group for b in group), (row, number)
            checked += len(medians) + len(ratios)
    assert checked > 100, checked

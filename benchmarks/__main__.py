"""`python -m benchmarks [pytest args]`: run the benchmarks, then write results keyed by device,
versions and date under benchmarks/results/: the pytest-benchmark JSON, a markdown table and a plot
(a later run of the same day adds -run2, -run3, ...: it never overwrites an earlier one's files).

    python -m benchmarks                       # everything (CPU; the GPU ones where a GPU is present)
    python -m benchmarks -k topk_threshold     # a chosen set
"""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from .report import median_seconds, table

RESULTS = Path(__file__).parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "-")
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def plot(results: dict, path: Path) -> bool:
    """Speed-up of bipkernels over each baseline, one bar group per benchmark group."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        return False
    groups: dict[str, list] = {}
    for bench in results["benchmarks"]:
        groups.setdefault(bench["group"], []).append(bench)
    labels, values = [], []
    for group, benches in groups.items():
        ours = next((b for b in benches if not b["extra_info"].get("baseline")), None)
        for bench in benches:
            if ours is not None and bench is not ours:
                labels.append(f"{group}\nvs {bench['params'].get('method')}")
                values.append(median_seconds(bench) / median_seconds(ours))
    figure, axes = pyplot.subplots(figsize=(8, 0.35 * len(values) + 1))
    axes.barh(range(len(values)), values)
    axes.set_yticks(range(len(values)), labels, fontsize=6)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xlabel("speed-up of bipkernels (baseline median / bipkernels median)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return True


def main(argv: list[str]) -> int:
    stamp = f"{device_name()}-torch{torch.__version__.split('+')[0]}-{datetime.date.today().isoformat()}"
    RESULTS.mkdir(exist_ok=True)
    taken, run = stamp, 1
    while (RESULTS / f"{stamp}.json").exists():  # an earlier run of the day keeps its files
        run += 1
        stamp = f"{taken}-run{run}"
    json_path = RESULTS / f"{stamp}.json"
    # Warm-up rounds first: the first benchmark of a session ran 2.7× slow without them (first-touch pages,
    # allocator and thread-pool warm-up), and a warm kernel is what a training loop runs.
    code = pytest.main(["-q", str(Path(__file__).parent), "--benchmark-warmup=on", f"--benchmark-json={json_path}",
                        *argv])
    # pytest-benchmark writes the JSON of what ran also after a failure or an interrupt (a time limit's
    # SIGINT): the table and plot are made from it all the same, and the exit status still says so.
    if not json_path.exists():
        return int(code) or 1
    results = json.loads(json_path.read_text())
    text = table(results)
    (RESULTS / f"{stamp}.md").write_text(text + "\n")
    print(text)
    if plot(results, RESULTS / f"{stamp}.png"):
        print(f"wrote {json_path}, {stamp}.md and {stamp}.png in {RESULTS}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

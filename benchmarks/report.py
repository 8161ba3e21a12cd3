"""Markdown table from a pytest-benchmark JSON file: median per method and its ratio to each baseline.

    python -m benchmarks.report results.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path


def table(results: dict) -> str:
    groups = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"]].append(bench)
    machine = results.get("machine_info", {})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
             f"{machine.get('cpu', {}).get('count', '?')} cores; {results.get('datetime', '')}", ""]
    for group, benches in groups.items():
        ours = next((b for b in benches if not b["extra_info"].get("baseline")), None)
        # Iteration groups also compare every row with one dense training step.
        dense = next((b for b in benches if b["params"].get("method") == "dense step"), None)
        lines += [f"**{group}**", "", "| method | median (ms) | speed-up of bipkernels |"
                  + (" × dense step |" if dense else ""), "|---|---:|---:|" + ("---:|" if dense else "")]
        for bench in benches:
            median = bench["stats"]["median"]
            ratio = f"{median / ours['stats']['median']:.1f}×" if ours and bench is not ours else "—"
            name = bench["params"].get("method", bench["name"])
            versus_dense = f" {median / dense['stats']['median']:.2f} |" if dense else ""
            lines.append(f"| {name} | {median * 1e3:.2f} | {ratio} |{versus_dense}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    text = table(json.loads(Path(args.json).read_text()))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

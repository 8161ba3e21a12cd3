"""Markdown table from a pytest-benchmark JSON file: median per method and its ratio to each baseline.

    python -m benchmarks.report results.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path


def median_seconds(bench: dict) -> float:
    """The CUDA-event median of a GPU benchmark (benchmarks/gpu.py), else pytest-benchmark's median."""
    return bench["extra_info"].get("cuda_median_s", bench["stats"]["median"])


def table(results: dict) -> str:
    groups = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench["group"]].append(bench)
    machine = results.get("machine_info", {})
    gpus = sorted({b["extra_info"]["device"] for b in results["benchmarks"] if "device" in b["extra_info"]})
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
             f"{machine.get('cpu', {}).get('count', '?')} cores" + "".join(f"; GPU {gpu}" for gpu in gpus)
             + f"; {results.get('datetime', '')}", ""]
    for group, benches in groups.items():
        ours = next((b for b in benches if not b["extra_info"].get("baseline")), None)
        # Iteration groups also compare every row with one dense training step.
        dense = next((b for b in benches if b["params"].get("method") == "dense step"), None)
        bandwidth = any("gbps" in b["extra_info"] for b in benches)
        lines += [f"**{group}**", "", "| method | median (ms) | speed-up of bipkernels |"
                  + (" × dense step |" if dense else "") + (" GB/s | of copy |" if bandwidth else ""),
                  "|---|---:|---:|" + ("---:|" if dense else "") + ("---:|---:|" if bandwidth else "")]
        for bench in benches:
            median = median_seconds(bench)
            ratio = f"{median / median_seconds(ours):.1f}×" if ours and bench is not ours else "—"
            name = bench["params"].get("method", bench["name"])
            versus_dense = f" {median / median_seconds(dense):.2f} |" if dense else ""
            info = bench["extra_info"]
            rate = f" {info['gbps']:.0f} | {info['fraction_of_copy']:.0%} |" if "gbps" in info else \
                (" — | — |" if bandwidth else "")
            lines.append(f"| {name} | {median * 1e3:.3f} | {ratio} |{versus_dense}{rate}")
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

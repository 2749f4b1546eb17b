"""The papers' figures, drawn from runs of this code (S-LoRA, arXiv 2311.03285, Figure 5).

S-LoRA's Figure 5 plots, for each serving system, throughput and mean latency against the number
of adapters (5 to 2000): slora stays nearly flat while the baselines fall. `serve.py --figure5
PATH` replays the benchmark's trace once per adapter count and mode (--repeat times) and hands
the rows to `figure5`, which writes every number to PATH's .json first, then the picture: one
point per mode and count at the median, the bars spanning the runs' range.
matplotlib draws it and is not a dependency of the project: `require_matplotlib` says how to
install it, before any run starts.
Demo: `python serve.py --figure5 fig5.svg --layers 4 --duration 4 --repeat 3`.
"""
import importlib.util
import json
import os
from statistics import median
from typing import Dict, List


def require_matplotlib(flag: str):
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"{flag} draws with matplotlib, which is not a dependency of this project: "
                         f"pip install matplotlib")


def summary(points: Dict[int, Dict[str, List[dict]]], key: str) -> Dict[str, dict]:
    """mode -> {"adapters": [n, ...], "median": [...], "low": [...], "high": [...]} of row[key]."""
    out: Dict[str, dict] = {}
    for n in sorted(points):
        for mode, rows in points[n].items():
            values = [r[key] for r in rows]
            s = out.setdefault(mode, {"adapters": [], "median": [], "low": [], "high": []})
            s["adapters"].append(n)
            s["median"].append(median(values))
            s["low"].append(min(values))
            s["high"].append(max(values))
    return out


def figure5(points: Dict[int, Dict[str, List[dict]]], path: str, title: str) -> str:
    """points[n][mode]: the report rows of each run with n adapters. Writes PATH.json (every row
    and the medians) and the picture; returns the .json path."""
    numbers = os.path.splitext(path)[0] + ".json"
    panels = (("req/s", "throughput (requests/s)"), ("latency", "mean latency (s)"))
    with open(numbers, "w") as f:
        json.dump({"title": title, "runs": {str(n): p for n, p in points.items()},
                   **{key: summary(points, key) for key, _ in panels}}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, panels):
        for mode, s in summary(points, key).items():
            err = [[m - lo for m, lo in zip(s["median"], s["low"])],
                   [hi - m for m, hi in zip(s["median"], s["high"])]]
            ax.errorbar(s["adapters"], s["median"], yerr=err, marker="o", capsize=3, label=mode)
        ax.set_xscale("log")
        ax.set_xlabel("number of adapters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return numbers

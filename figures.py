"""The papers' figures, drawn from runs of this code (S-LoRA, arXiv 2311.03285, Figures 5, 6;
LoRA, arXiv 2106.09685, section 7.2).

S-LoRA's Figure 5 plots, for each serving system, throughput and mean latency against the number
of adapters (5 to 2000): slora stays nearly flat while the baselines fall. `serve.py --figure5
PATH` replays the benchmark's trace once per adapter count and mode (--repeat times) and hands
the rows to `figure5`; `--figure6 PATH` does the same over request rates, early abort against
FCFS (throughput, first-token latency, SLO attainment). Every number goes to PATH's .json first,
then the picture: a point per variant and x at the median of the runs, the bars their range.
`train.py --plot` draws the loss curves beside results.json (loss.svg) and, with --sweep, the
rank x targets table as a heatmap (sweep.svg).
matplotlib draws them and is not a dependency of the project: `require_matplotlib` says how to
install it, before any run starts.
Simplified: the axes are the paper's, the workloads this machine's (a small model past saturation
on a CPU, not Llama-7B on A100s); a point's bars span only the runs made (--repeat).
Demo: `python serve.py --figure5 fig5.svg --layers 4 --duration 4 --repeat 3`.
"""
import importlib.util
import json
import os
from statistics import median
from typing import Dict, List


def require_matplotlib(flag: str):
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"{flag} draws with matplotlib, which is not a dependency of this "
                         f"project: pip install matplotlib")


def summary(points: Dict[float, Dict[str, List[dict]]], key: str) -> Dict[str, dict]:
    """variant -> {"x": [x, ...], "median": [...], "low": [...], "high": [...]} of row[key]."""
    out: Dict[str, dict] = {}
    for n in sorted(points):
        for mode, rows in points[n].items():
            values = [r[key] for r in rows]
            s = out.setdefault(mode, {"x": [], "median": [], "low": [], "high": []})
            s["x"].append(n)
            s["median"].append(median(values))
            s["low"].append(min(values))
            s["high"].append(max(values))
    return out


def plot(points: Dict[float, Dict[str, List[dict]]], path: str, title: str, x_label: str,
         panels: tuple, log_x: bool = False) -> str:
    """points[x][variant]: the report rows of each run at x. Writes PATH.json (every row and the
    medians) first, then the picture, one panel per (row key, label); returns the .json path."""
    numbers = os.path.splitext(path)[0] + ".json"
    with open(numbers, "w") as f:
        json.dump({"title": title, "x": x_label, "runs": {str(x): p for x, p in points.items()},
                   **{key: summary(points, key) for key, _ in panels}}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, label) in zip(axes, panels):
        for variant, s in summary(points, key).items():
            err = [[m - lo for m, lo in zip(s["median"], s["low"])],
                   [hi - m for m, hi in zip(s["median"], s["high"])]]
            ax.errorbar(s["x"], s["median"], yerr=err, marker="o", capsize=3, label=variant)
        ax.set_xscale("log" if log_x else "linear")
        ax.set(xlabel=x_label, ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return numbers


def figure5(points, path: str, title: str) -> str:
    """Throughput and mean latency of every mode against the number of adapters."""
    return plot(points, path, title, "number of adapters",
                (("req/s", "throughput (requests/s)"), ("latency", "mean latency (s)")), log_x=True)


def figure6(points, path: str, title: str) -> str:
    """Throughput, first-token latency and SLO attainment against the request rate."""
    return plot(points, path, title, "request rate (requests/s)",
                (("req/s", "throughput (requests/s)"), ("ttft", "mean first-token latency (s)"),
                 ("slo", "SLO attainment")))


def training_plots(out: str, runs: List[dict], sweep: bool, log=print):
    """train.py --plot: every run's losses (loss.svg) and, after --sweep, its BLEU heatmap."""
    runs = [r for r in runs if r.get("losses")]
    label = lambda r: r.get("name") or f"{r['method']} r={r['rank']} {r['targets']}"   # noqa: E731
    loss_curves({label(r): r for r in runs}, os.path.join(out, "loss.svg"),
                "training and validation loss")
    if sweep:
        heatmap({(r["rank"], r["targets"]): r["BLEU"] for r in runs if "BLEU" in r},
                os.path.join(out, "sweep.svg"), "E2E BLEU of the rank study", "rank r",
                "adapted matrices")
    log(f"wrote {os.path.join(out, 'loss.svg')}{' and sweep.svg' if sweep else ''}")


def loss_curves(history: Dict[str, dict], path: str, title: str):
    """Each run's training loss per step and validation loss (points), one picture."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, h) in enumerate(history.items()):
        line, = ax.plot(range(1, len(h["losses"]) + 1), h["losses"], lw=1, label=f"{name} (train)")
        if h.get("val_losses"):
            steps, vals = zip(*h["val_losses"])
            ax.plot(steps, vals, "o--", color=line.get_color(), label=f"{name} (validation)")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def heatmap(values: Dict[tuple, float], path: str, title: str, row_label: str, col_label: str):
    """values[(row, column)] as a coloured table with the numbers written in (the rank study)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted({r for r, _ in values}, key=str)
    cols = list(dict.fromkeys(c for _, c in values))
    grid = [[values.get((r, c), float("nan")) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(cols), 1 + 0.6 * len(rows)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set(xlabel=col_label, ylabel=row_label, title=title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

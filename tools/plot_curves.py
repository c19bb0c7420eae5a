#!/usr/bin/env python
"""Training curves of one or several runs side by side (the gate paper's Figs. 2-5).

    python tools/plot_curves.py RUN [RUN ...] [--metrics reward/mean,entropy,eur] [--smooth 0.6] \
        [--steps A:B] [--labels ...] [--cols 4] [--out STEM] [--format png pdf svg]

One panel per metric, one line per run (smoothed with a TensorBoard-style EMA, the raw values
drawn faintly behind). Reads `<run>/metrics.jsonl`, or the TensorBoard files in `<run>/tb/` when
that is all there is. Panels whose metric no run logged are left out. Default STEM:
<first run>/plots/curves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _plotting as P  # noqa: E402
from _plotting import plt  # noqa: E402

DEFAULT_METRICS = (
    "reward/mean", "reward/answer", "reward/format", "entropy",
    "eur", "clip_frac", "frac_LN", "frac_HP",
    "frac_LP", "frac_HN", "response_len/mean", "kl_ref", "kl_old",
)
TITLES = {
    "reward/mean": "reward (answer + format)", "reward/answer": "answer reward", "reward/format": "format reward",
    "entropy": "policy entropy", "eur": "effective update ratio (EUR)", "clip_frac": "clip fraction",
    "frac_M": "fraction in M (in boundary)", "frac_LN": "fraction LN (left boundary, A<=0)",
    "frac_HP": "fraction HP (right boundary, A>0)", "frac_LP": "fraction LP (reverse left, A>0)",
    "frac_HN": "fraction HN (reverse right, A<=0)", "response_len/mean": "mean response length (tokens)",
    "kl_ref": "KL to reference", "kl_old": "KL to old policy (k3)",
}


def plot_curves(frames: list, labels: list[str], metrics: list[str], stem, formats, smooth: float = 0.6,
                cols: int = 4, title: str | None = None, x: str = "step") -> list[Path]:
    return P.save_figure(curves_figure(frames, labels, metrics, smooth, cols, title, x), stem, formats)


def curves_figure(frames: list, labels: list[str], metrics: list[str], smooth: float = 0.6, cols: int = 4,
                  title: str | None = None, x: str = "step"):
    """Grid of panels, one per metric present in at least one run (panel title = TITLES or the key)."""
    present = [m for m in metrics if any(m in df.columns and df[m].notna().any() for df in frames)]
    if not present:
        have = sorted(set().union(*(df.columns for df in frames)) - {"step"})
        raise ValueError(f"none of the metrics {metrics} was logged; available: {', '.join(have)}")
    cols = max(1, min(cols, len(present)))
    rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.1 * cols, 3.0 * rows + 0.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, metric in enumerate(present):
        ax = axes[k // cols, k % cols]
        ax.set_label(f"curve:{metric}")
        for i, (df, label) in enumerate(zip(frames, labels)):
            if metric not in df.columns:
                continue
            d = df[["step", metric] + ([x] if x != "step" else [])].dropna(subset=[metric])
            if not len(d):
                continue
            xs = d[x].to_numpy(dtype=float)
            ys = d[metric].to_numpy(dtype=float)
            color = colors[i % len(colors)]
            if smooth > 0 and len(ys) > 1:
                ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
                ax.plot(xs, P.ema(ys, smooth), color=color, lw=1.8, label=label)
            else:
                ax.plot(xs, ys, color=color, lw=1.6, label=label, marker="o" if len(ys) < 3 else None)
        ax.set_title(TITLES.get(metric, metric), fontsize=10)
        if x == "step":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step" if x == "step" else x)
        ax.grid(alpha=0.3)
    for k in range(len(present), rows * cols):
        axes[k // cols, k % cols].axis("off")
    handles, names = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:  # the legend of the panel with the most runs
        h, n = ax.get_legend_handles_labels()
        if len(n) > len(names):
            handles, names = h, n
    suffix = f" (EMA smoothing {smooth:g})" if smooth > 0 else ""
    fig.suptitle((title or "training curves") + suffix, y=1.0)
    spare = rows * cols > len(present)
    fig.tight_layout(rect=(0, 0 if spare or len(frames) == 1 else 0.05, 1, 0.98))
    if handles and spare:  # the legend goes into the first empty cell
        axes[len(present) // cols, len(present) % cols].legend(handles, names, loc="center", fontsize=10,
                                                                title="run", frameon=False)
    elif handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=9, frameon=False)
    return fig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Training curves (reward, entropy, EUR, regions, length, KL) per run.")
    ap.add_argument("runs", nargs="+", help="run directories (metrics.jsonl or tb/)")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                    help="comma list of metrics.jsonl keys (default: %(default)s)")
    ap.add_argument("--smooth", type=float, default=0.6, help="EMA weight in [0, 1): 0 = raw (default 0.6)")
    ap.add_argument("--steps", default=None, help="step range A:B, A:, :B")
    ap.add_argument("--x", default="step", help="x axis: step (default) or a cumulative metric such as data/index")
    ap.add_argument("--labels", nargs="+", default=None, help="one label per run (default: folder names)")
    ap.add_argument("--cols", type=int, default=4, help="panels per row")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", default=None, help="output stem, files STEM.<fmt> (default <run1>/plots/curves)")
    ap.add_argument("--format", nargs="+", default=["png"], help="png (default), pdf, svg; several allowed")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        formats = P.check_formats(args.format)
        lo, hi = P.parse_steps(args.steps)
        labels = P.label_runs(args.runs, args.labels)
        frames = []
        for run in args.runs:
            df = P.read_metrics(run)
            df = df[P.in_range(df["step"], lo, hi)]
            if not len(df):
                raise ValueError(f"{run}: no logged steps in the range {args.steps}")
            if args.x != "step" and args.x not in df.columns:
                raise ValueError(f"{run}: --x {args.x!r} is not a logged metric")
            frames.append(df)
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        stem = Path(args.out) if args.out else Path(args.runs[0]) / "plots" / "curves"
        written = plot_curves(frames, labels, metrics, stem, formats, args.smooth, args.cols, args.title, args.x)
    except (ValueError, FileNotFoundError) as e:
        print(f"plot_curves: error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

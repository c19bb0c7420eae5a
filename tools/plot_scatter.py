#!/usr/bin/env python
"""The ratio / probability pictures of a run's per-token dumps (DGPO Fig. 4a-c).

    python tools/plot_scatter.py RUN [RUN ...] [--steps A:B] [--loss SPEC ...] \
        [--plots joint,weights,ratios] [--out STEM] [--format png pdf svg]

Reads `<run>/tokens/step_*.parquet` (columns in notes/RUNDIR.md) and writes
  STEM_joint[_<run>].<fmt>   (a) joint distribution of token probability (x, log) and importance
                              ratio (y, log): hexbin with marginals, one panel for A > 0 and one for
                              A <= 0, trust-region lines at L = 1 - eps_low and U = 1 + eps_high,
                              the five regions labelled with their token fractions
  STEM_weights.<fmt>         (b) relative gradient weight w / r per region against the token
                              probability (top) and the ratio (bottom), one column per --loss,
                              recomputed with the real loss zoo on the first run's tokens
  STEM_ratios.<fmt>          (c) the ratio distributions of all runs overlaid (A > 0 / A <= 0)
Default STEM: <first run>/plots/scatter. --plots picks which (default: all; `ratios` needs no
second run but is most useful with several).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _plotting as P  # noqa: E402
from _plotting import plt  # noqa: E402

PLOTS = ("joint", "weights", "ratios")
SIDE_REGIONS = {True: ("HP", "M", "LP"), False: ("HN", "M", "LN")}  # top to bottom, per sign of A


def _bounds(tokens) -> tuple[float, float]:
    eps_low = float(tokens["eps_low"].iloc[0])
    eps_high = float(tokens["eps_high"].iloc[0])
    return 1.0 - eps_low, 1.0 + eps_high


def _log_limits(values: np.ndarray, must_include: tuple[float, ...] = (), pad: float = 1.25) -> tuple[float, float]:
    v = values[np.isfinite(values) & (values > 0)]
    lo = float(v.min()) if len(v) else 1.0
    hi = float(v.max()) if len(v) else 1.0
    for x in must_include:
        lo, hi = min(lo, x), max(hi, x)
    return lo / pad, hi * pad


# ----------------------------------------------------------------------------- (a) joint

def plot_joint(tokens, title: str, stem, formats, prob_column: str = "prob", gridsize: int = 45) -> list[Path]:
    return P.save_figure(joint_figure(tokens, title, prob_column, gridsize), stem, formats)


def joint_figure(tokens, title: str, prob_column: str = "prob", gridsize: int = 45):
    """Hexbin of (probability, ratio) with marginals, split by the sign of the advantage."""
    low, high = _bounds(tokens)
    prob = tokens[prob_column].to_numpy(dtype=float)
    ratio = tokens["ratio"].to_numpy(dtype=float)
    positive = tokens["advantage"].to_numpy(dtype=float) > 0
    ok = (prob > 0) & (ratio > 0) & np.isfinite(prob) & np.isfinite(ratio)
    n_total = int(ok.sum())
    if n_total == 0:
        raise ValueError(f"{title}: no tokens with positive probability and ratio to plot")
    xlim = _log_limits(prob[ok], pad=1.3)
    xlim = (xlim[0], min(xlim[1], 1.0) * 1.3)
    ylim = _log_limits(ratio[ok], must_include=(low * 0.92, high * 1.08))
    xbins = np.geomspace(*xlim, 40)
    ybins = np.geomspace(*ylim, 40)
    regions = tokens["region"].astype(str).to_numpy()

    fig = plt.figure(figsize=(13, 5.6))
    gs = fig.add_gridspec(2, 7, width_ratios=[4, 1, 0.5, 4, 1, 0.45, 0.18], height_ratios=[1, 4],
                          wspace=0.05, hspace=0.05)
    hb = None
    vmax = 1
    for sign in (True, False):
        sel = ok & (positive == sign)
        vmax = max(vmax, _max_hex_count(prob[sel], ratio[sel], xlim, ylim, gridsize))
    for col, sign in ((0, True), (3, False)):
        sel = ok & (positive == sign)
        ax = fig.add_subplot(gs[1, col])
        top = fig.add_subplot(gs[0, col], sharex=ax)
        right = fig.add_subplot(gs[1, col + 1], sharey=ax)
        ax.set_label("joint:" + ("pos" if sign else "neg"))  # lets tests find the panels
        ax.set_xscale("log")
        ax.set_yscale("log")
        if sel.any():
            hb = ax.hexbin(prob[sel], ratio[sel], xscale="log", yscale="log", gridsize=gridsize,
                           extent=(np.log10(xlim[0]), np.log10(xlim[1]), np.log10(ylim[0]), np.log10(ylim[1])),
                           bins="log", mincnt=1, cmap="viridis", vmin=1, vmax=vmax, linewidths=0)
            top.hist(prob[sel], bins=xbins, color="#555555", alpha=0.8, log=True)
            right.hist(ratio[sel], bins=ybins, orientation="horizontal", color="#555555", alpha=0.8, log=True)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        P.plain_log_ticks(ax.yaxis, *ylim)
        for line, name in ((low, "L"), (high, "U")):
            for a in (ax, right):
                a.axhline(line, color="crimson", ls="--", lw=1.2)
            right.text(1.02, line, f"{name}={line:g}", color="crimson", va="center", fontsize=8,
                       transform=right.get_yaxis_transform())
        # region labels (left, where tokens are rare) with their share of all plotted tokens
        centers = {"top": np.sqrt(high * ylim[1]), "mid": np.sqrt(low * high), "bottom": np.sqrt(ylim[0] * low)}
        for region, where in zip(SIDE_REGIONS[sign], ("top", "mid", "bottom")):
            share = (sel & (regions == region)).sum() / n_total * 100
            ax.text(xlim[0] * 1.6, centers[where], f"{region} {share:.1f}%", ha="left", va="center",
                    fontsize=9 if where == "mid" else 10, fontweight="bold", color=P.REGION_COLORS[region],
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=P.REGION_COLORS[region], alpha=0.85))
        sign_text = "A > 0 (positive)" if sign else "A <= 0 (negative)"
        top.set_title(f"{sign_text}: {int(sel.sum())} tokens", fontsize=10)
        ax.set_xlabel(f"token probability ({'pi_theta' if prob_column == 'prob' else 'pi_old'}, log)")
        if col == 0:
            ax.set_ylabel("importance ratio r (log)")
        else:
            ax.tick_params(labelleft=True)
        top.tick_params(labelbottom=False)
        top.set_yticks([])
        right.tick_params(labelleft=False)
        right.set_xticks([])
        for a in (top, right):
            for s in ("top", "right"):
                a.spines[s].set_visible(False)
    if hb is not None:
        cax = fig.add_subplot(gs[1, 6])
        fig.colorbar(hb, cax=cax, label="tokens per bin (log)")
    steps = tokens["step"]
    fig.suptitle(f"{title}: probability vs importance ratio, steps {steps.min()}-{steps.max()} "
                 "(region labels: % of all tokens; marginals: log counts)", y=0.995)
    return fig


def _max_hex_count(x, y, xlim, ylim, gridsize) -> int:
    if len(x) == 0:
        return 1
    fig, ax = plt.subplots()
    hb = ax.hexbin(x, y, xscale="log", yscale="log", gridsize=gridsize, mincnt=1,
                   extent=(np.log10(xlim[0]), np.log10(xlim[1]), np.log10(ylim[0]), np.log10(ylim[1])))
    counts = hb.get_array()
    plt.close(fig)
    return int(counts.max()) if len(counts) else 1


# ----------------------------------------------------------------------------- (b) weights

def plot_weights(tokens, specs: list[P.LossSpec], title: str, stem, formats, prob_column: str = "prob",
                 weight_scale: str = "symlog", max_points: int = 20000, seed: int = 0) -> list[Path]:
    fig = weights_figure(tokens, specs, title, prob_column, weight_scale, max_points, seed)
    return P.save_figure(fig, stem, formats)


def weights_figure(tokens, specs: list[P.LossSpec], title: str, prob_column: str = "prob",
                   weight_scale: str = "symlog", max_points: int = 20000, seed: int = 0):
    """Relative gradient weight w / r against probability (row 1) and ratio (row 2), per loss."""
    low, high = _bounds(tokens)
    eps_low, eps_high = 1.0 - low, high - 1.0
    rng = np.random.default_rng(seed)
    if len(tokens) > max_points:
        tokens = tokens.iloc[np.sort(rng.choice(len(tokens), max_points, replace=False))]
    prob = tokens[prob_column].to_numpy(dtype=float)
    ratio = tokens["ratio"].to_numpy(dtype=float)
    adv = tokens["advantage"].to_numpy(dtype=float)
    xlim_p = _log_limits(prob[prob > 0], pad=1.3)
    xlim_r = _log_limits(ratio[ratio > 0], must_include=(low * 0.92, high * 1.08))
    fig, axes = plt.subplots(2, len(specs), figsize=(4.4 * len(specs) + 0.6, 7.6), squeeze=False, sharey="row")
    shares = {}
    for j, spec in enumerate(specs):
        rel, regions = P.recompute_weights(spec, ratio, adv, eps_low, eps_high)
        for i, (x, xlim, xlabel) in enumerate(((prob, xlim_p, "token probability (log)"),
                                               (ratio, xlim_r, "importance ratio r (log)"))):
            ax = axes[i, j]
            ax.set_label(f"weights:{spec.label}:{'prob' if i == 0 else 'ratio'}")
            for region in P.REGIONS:
                sel = regions == region
                if not sel.any():
                    continue
                shares[region] = sel.mean() * 100
                ax.scatter(x[sel], rel[sel], s=5, alpha=0.5, color=P.REGION_COLORS[region], lw=0, rasterized=True)
            ax.set_xscale("log")
            ax.set_xlim(*xlim)
            if i == 1:
                P.plain_log_ticks(ax.xaxis, *xlim)
            if weight_scale == "symlog":
                ax.set_yscale("symlog", linthresh=1.0, linscale=1.5)
            elif weight_scale == "log":
                ax.set_yscale("log")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.axhline(0.0, color="grey", lw=0.8)
            if i == 1:
                for line in (low, high):
                    ax.axvline(line, color="crimson", ls="--", lw=1)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.25, which="major")
        means = "  ".join(f"{r} {rel[regions == r].mean():.2f}" for r in P.REGIONS[1:] if (regions == r).any())
        axes[0, j].set_title(f"{spec.label}: EUR = {rel.mean():.3f}\nmean w/r  {means}", fontsize=9.5)
    axes[0, 0].set_ylabel("relative gradient weight w / r")
    axes[1, 0].set_ylabel("relative gradient weight w / r")
    handles = [plt.Line2D([], [], marker="o", ls="", color=P.REGION_COLORS[r],
                          label=f"{P.REGION_TITLES[r]}: {shares.get(r, 0):.1f}% of tokens") for r in P.REGIONS]
    handles.append(plt.Line2D([], [], ls="--", color="crimson", label=f"L = {low:g}, U = {high:g}"))
    fig.suptitle(f"{title}: per-token relative gradient weight by region (the same tokens under each loss)", y=0.995)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8.5, frameon=False)
    return fig


# ----------------------------------------------------------------------------- (c) ratio overlay

def plot_ratios(token_sets, labels: list[str], stem, formats, bins: int = 80) -> list[Path]:
    return P.save_figure(ratios_figure(token_sets, labels, bins), stem, formats)


def ratios_figure(token_sets, labels: list[str], bins: int = 80):
    """Ratio histograms (log-spaced bins, fraction of tokens per bin) of several runs, A > 0 and A <= 0 panels."""
    all_r = np.concatenate([t["ratio"].to_numpy(dtype=float) for t in token_sets])
    bounds = sorted({_bounds(t) for t in token_sets})
    lows = [b[0] for b in bounds]
    highs = [b[1] for b in bounds]
    lim = _log_limits(all_r[all_r > 0], must_include=(min(lows) * 0.92, max(highs) * 1.08), pad=1.1)
    edges = np.geomspace(*lim, bins + 1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, sign in zip(axes, (True, False)):
        ax.set_label("ratios:" + ("pos" if sign else "neg"))
        for k, (t, label) in enumerate(zip(token_sets, labels)):
            positive = t["advantage"].to_numpy(dtype=float) > 0
            r = t["ratio"].to_numpy(dtype=float)[positive == sign]
            r = r[r > 0]
            if not len(r):
                continue
            low, high = _bounds(t)
            outside = ((r < low) | (r > high)).mean() * 100
            ax.hist(r, bins=edges, weights=np.full(len(r), 1.0 / len(r)), histtype="step", lw=1.6, color=colors[k % len(colors)],
                    label=f"{label} (n={len(r)}, {outside:.1f}% outside [L, U])")
        for line in lows + highs:
            ax.axvline(line, color="crimson", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*lim)
        P.plain_log_ticks(ax.xaxis, *lim)
        ax.set_xlabel("importance ratio r (log)")
        ax.set_title("A > 0 (positive tokens)" if sign else "A <= 0 (negative tokens)", fontsize=10)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8)
        for line, name in ((lows[0], "L"), (highs[0], "U")):
            ax.text(line, 0.98, f"{name} ", color="crimson", ha="right", va="top", fontsize=9,
                    transform=ax.get_xaxis_transform())
    axes[0].set_ylabel("fraction of tokens per bin (log)")
    fig.suptitle(f"importance-ratio distribution per run (L = {lows[0]:g}, U = {highs[0]:g})", y=1.0)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="DGPO Fig. 4-style ratio / probability plots from per-token dumps.")
    ap.add_argument("runs", nargs="+", help="run directories (each with tokens/step_*.parquet)")
    ap.add_argument("--steps", default=None, help="step range A:B, A:, :B or A (default: all dumped steps)")
    ap.add_argument("--last-update", action="store_true",
                    help="keep only each step's last optimizer update (the final mini-batch, as in DGPO Fig. 4a)")
    ap.add_argument("--loss", action="append", default=None, metavar="SPEC",
                    help="loss for the weight plot, repeatable: grpo, dgpo:n=2,m=2, sapo_erf, sapo:gate=erf,tau_pos=10 "
                         "(default: the first run's own loss)")
    ap.add_argument("--plots", default="joint,weights,ratios", help="comma list of joint, weights, ratios")
    ap.add_argument("--labels", nargs="+", default=None, help="one label per run (default: folder names)")
    ap.add_argument("--prob-column", choices=("prob", "old_prob"), default="prob",
                    help="x axis: current policy probability (prob) or the sampler's (old_prob)")
    ap.add_argument("--nonzero-adv", action="store_true", help="drop tokens with A == 0 (groups without signal)")
    ap.add_argument("--weight-scale", choices=("symlog", "linear", "log"), default="symlog",
                    help="y scale of the weight plot (symlog shows 0 and diverging weights)")
    ap.add_argument("--max-points", type=int, default=20000, help="tokens drawn in the weight scatter")
    ap.add_argument("--out", default=None, help="output stem; files are STEM_<plot>.<fmt> (default <run1>/plots/scatter)")
    ap.add_argument("--format", nargs="+", default=["png"], help="png (default), pdf, svg; several allowed")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plots = [p.strip() for p in args.plots.split(",") if p.strip()]
        bad = [p for p in plots if p not in PLOTS]
        if bad:
            raise ValueError(f"--plots: unknown plot(s) {bad}; valid: {', '.join(PLOTS)}")
        formats = P.check_formats(args.format)
        lo, hi = P.parse_steps(args.steps)
        labels = P.label_runs(args.runs, args.labels)
        token_sets = []
        for run in args.runs:
            t = P.read_tokens(run, lo, hi, last_update_only=args.last_update)
            if args.nonzero_adv:
                t = t[t["advantage"] != 0].reset_index(drop=True)
                if not len(t):
                    raise ValueError(f"{run}: every dumped token has A == 0")
            token_sets.append(t)
        stem = Path(args.out) if args.out else Path(args.runs[0]) / "plots" / "scatter"
        written: list[Path] = []
        if "joint" in plots:
            for t, label in zip(token_sets, labels):
                suffix = "_joint" if len(token_sets) == 1 else f"_joint_{Path(label).name}"
                written += plot_joint(t, label, stem.with_name(stem.name + suffix), formats, args.prob_column)
        if "weights" in plots:
            specs = ([P.parse_loss_spec(s) for s in args.loss] if args.loss
                     else [P.run_loss_spec(args.runs[0], token_sets[0])])
            written += plot_weights(token_sets[0], specs, labels[0], stem.with_name(stem.name + "_weights"), formats,
                                    args.prob_column, args.weight_scale, args.max_points)
        if "ratios" in plots:
            written += plot_ratios(token_sets, labels, stem.with_name(stem.name + "_ratios"), formats)
    except (ValueError, FileNotFoundError) as e:
        print(f"plot_scatter: error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

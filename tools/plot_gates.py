"""Figures of the gates and of every loss's gradient weight, drawn from the implementation itself.

    python tools/plot_gates.py [--out docs/img]

Writes
  gates_fig1.png        the gate paper's Figure 1 redrawn: each gate f (top row) and its
                        derivative f' (bottom row, by autograd) for tau in {1, 5, 10}, with
                        hard clipping clip(x, 1 - eps, 1 + eps), eps = 0.2, beside them.
  weights_relative.png  the relative gradient weight w / r against r for every loss, for A > 0
                        and A < 0, taken from `policy_loss(...).weight` (symlog y axis: 0 is
                        drawn as 0, and the tails as on a log axis).
Prints the written paths, one per line, and a JSON list of them on the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from rlengine.losses import GATES, policy_loss  # noqa: E402

TAUS = (1.0, 5.0, 10.0)
CLIP_EPS = 0.2
GATE_ORDER = ("sigmoid", "erf", "arctan", "softsign")
GATE_TITLES = {"sigmoid": "sigmoid, eq. (3)", "erf": "erf, eq. (6)", "arctan": "arctan, eq. (7)",
               "softsign": "softsign, eq. (8)"}


def gate_and_derivative(name: str, x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    f = GATES[name](x, tau)
    (d,) = torch.autograd.grad(f.sum(), x)
    return f.detach(), d


def plot_gates(path: str) -> None:
    x = torch.linspace(0.0, 3.0, 1201, dtype=torch.float64)
    fig, axes = plt.subplots(2, 5, figsize=(20, 7.5), sharex=True)
    colors = dict(zip(TAUS, ("tab:blue", "tab:orange", "tab:green")))
    low, high = 1 - CLIP_EPS, 1 + CLIP_EPS
    clip = x.clamp(low, high)
    clip_grad = ((x >= low) & (x <= high)).double()
    axes[0, 0].plot(x, clip, color="k")
    axes[1, 0].plot(x, clip_grad, color="k", label=f"eps = {CLIP_EPS}")
    axes[0, 0].set_title(f"hard clip, clip(x, 1-eps, 1+eps)")
    for col, name in enumerate(GATE_ORDER, start=1):
        for tau in TAUS:
            f, d = gate_and_derivative(name, x, tau)
            axes[0, col].plot(x, f, color=colors[tau], label=f"tau = {tau:g}")
            axes[1, col].plot(x, d, color=colors[tau], label=f"tau = {tau:g}")
        axes[0, col].set_title(GATE_TITLES[name])
    for ax in axes.flat:
        ax.axvline(1.0, color="0.8", lw=0.8, zorder=0)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("x (importance ratio r)")
        ax.set_ylim(-0.05, 1.1)
        ax.legend(loc="upper right", fontsize=8)
    axes[0, 0].set_ylabel("gate f(x)")
    axes[1, 0].set_ylabel("derivative f'(x) = relative weight w / r")
    fig.suptitle("SAPO gate functions and their derivatives (autograd of rlengine.losses.GATES), "
                 "as the gate paper's Figure 1; note eq. (3) passes through (1, 2/tau)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


WEIGHT_CURVES = [  # (label, loss, hyperparameters, style)
    ("GRPO (c = 3)", "grpo", {}, dict(color="k", lw=2.2)),
    ("CISPO", "cispo", {}, dict(color="tab:red", lw=1.8)),
    ("GPPO", "gppo", {}, dict(color="tab:orange", lw=1.8, ls="--")),
    ("CE-GPPO (beta1 0.75, beta2 1)", "ce_gppo", {}, dict(color="tab:brown", lw=1.5, ls=":")),
    ("ASPO (c = 3)", "aspo", {}, dict(color="tab:purple", lw=1.5)),
    ("SAPO sigmoid (tau 1 / 1.05)", "sapo", {}, dict(color="tab:cyan", lw=1.5)),
    ("SAPO erf (tau 10 / 12)", "sapo", {"gate": "erf", "tau_pos": 10.0, "tau_neg": 12.0},
     dict(color="tab:olive", lw=1.5)),
    ("DGPO (n 1, m 2)", "dgpo", {}, dict(color="tab:green", lw=2.6)),
    ("DGPO (n 2, m 2)", "dgpo", {"n": 2.0, "m": 2.0}, dict(color="tab:green", lw=1.6, ls="--")),
]


def relative_weight(loss: str, params: dict, r: torch.Tensor, sign: float) -> torch.Tensor:
    logp = torch.log(r)[None, :]
    out = policy_loss(loss, logp, torch.zeros_like(logp), torch.tensor([sign], dtype=r.dtype),
                      torch.ones_like(logp, dtype=torch.bool), **params)
    return (out.weight / out.ratio)[0]


def plot_weights(path: str) -> None:
    r = torch.logspace(-2, 2, 2001, dtype=torch.float64)
    fig, axes = plt.subplots(1, 2, figsize=(18, 6.5), sharey=True)
    for ax, sign, title in ((axes[0], 1.0, "A > 0 (regions LP | M | HP)"), (axes[1], -1.0, "A < 0 (regions LN | M | HN)")):
        for label, loss, params, style in WEIGHT_CURVES:
            ax.plot(r, relative_weight(loss, params, r, sign), label=label, **style)
        for v, txt in ((0.8, "L"), (1.2, "U"), (3.0, "c")):
            ax.axvline(v, color="0.6", lw=0.8, ls="--")
            ax.text(v, 60, txt, ha="center", fontsize=9, color="0.4")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_ylim(-0.001, 120)
        ax.set_xlabel("importance ratio r")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("relative gradient weight w / r   (1 = plain IS, 0 = ignored)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9)
    fig.suptitle("Relative gradient weight per loss (eps = 0.2). A < 0, r < L: CISPO / GPPO weight L/r diverges "
                 "as r -> 0, DGPO's (r/L)^n decays to 0 and joins 1 continuously at r = L", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"), help="output folder (default docs/img)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, "gates_fig1.png"), os.path.join(args.out, "weights_relative.png")]
    plot_gates(paths[0])
    plot_weights(paths[1])
    for p in paths:
        print(p)
    print(json.dumps([os.path.relpath(p) for p in paths]))


if __name__ == "__main__":
    main()

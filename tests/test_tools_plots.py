"""tools/plot_scatter.py, tools/plot_curves.py and their helpers (tools/_plotting.py).

The run directories are real short training runs of the embedded default, made once per session
(`run_dir`: GRPO, 2 ranks, 3 steps; `second_run_dir`: DGPO, 1 rank, 2 steps; tests/real_runs.py).
A tiny real run leaves most regions empty, so the figure tests whose point is the regions run on
the synthetic run of tests/test_tools_synthetic.py (every region populated) as well. Expected
values are computed here independently: hand formulas from papers.md, the region thresholds, a
hand EMA, the token counts the trainer logged in metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import _plotting as P  # noqa: E402
import plot_curves  # noqa: E402
import plot_scatter  # noqa: E402
from tests.real_runs import clone_run, dumped_steps, metrics_by_step  # noqa: E402
from tests.test_gates import fprime_rtol  # noqa: E402
from tests.test_tools_synthetic import synthetic_run  # noqa: E402,F401  (fixture)

EPS64, EPS32 = float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)
BOTH_RUNS = pytest.mark.parametrize("which", ["run_dir", "synthetic_run"])


def _axes(fig, prefix: str) -> dict:
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label().startswith(prefix)}


def _bounds(tokens) -> list[float]:
    """L and U rounded to 6 decimals: the tools draw them from the same eps column by the same float64
    1 -/+ eps (equal to the last bit); the rounding only makes the list comparison readable, and
    a wrong bound (eps 0.2 vs 0.28) is 0.08 away."""
    return [round(1 - float(tokens["eps_low"].iloc[0]), 6), round(1 + float(tokens["eps_high"].iloc[0]), 6)]


def _png_is_a_picture(path: Path) -> None:
    from matplotlib.image import imread

    img = imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # not blank


# ----------------------------------------------------------------------------- helpers

def test_parse_steps():
    assert P.parse_steps(None) == (None, None)
    assert P.parse_steps("10:50") == (10, 50)
    assert P.parse_steps("10:") == (10, None)
    assert P.parse_steps(":5") == (None, 5)
    assert P.parse_steps("7") == (7, 7)
    with pytest.raises(ValueError, match="--steps"):
        P.parse_steps("a:b")


def test_ema_matches_hand_computation():
    # weight 0.5: acc = .5, norm = .5 -> 1; acc = .25 + 1.5 = 1.75, norm = .75 -> 7/3; NaN skipped
    out = P.ema([1.0, 3.0, float("nan"), 3.0], 0.5)
    # float64: each step rounds acc and norm twice and divides once (dyadic values here, so exact in
    # practice); <= 3 steps: 8 eps64 relative
    assert out[0] == pytest.approx(1.0, rel=8 * EPS64) and out[1] == pytest.approx(7 / 3, rel=8 * EPS64)
    assert math.isnan(out[2])
    assert out[3] == pytest.approx((0.5 * 1.75 + 1.5) / (0.5 * 0.75 + 0.5), rel=8 * EPS64)
    assert np.allclose(P.ema([2.0, 5.0], 0.0), [2.0, 5.0], rtol=4 * EPS64, atol=0)
    with pytest.raises(ValueError):
        P.ema([1.0], 1.0)


def test_loss_specs():
    spec = P.parse_loss_spec("sapo_erf")
    assert (spec.name, spec.params) == ("sapo", {"gate": "erf"})
    spec = P.parse_loss_spec("dgpo:n=2,m=3")
    assert (spec.name, spec.params) == ("dgpo", {"n": 2, "m": 3})
    spec = P.parse_loss_spec("sapo_arctan:tau_pos=10")
    assert spec.params == {"gate": "arctan", "tau_pos": 10}
    with pytest.raises(ValueError, match="unknown loss"):
        P.parse_loss_spec("nope")
    with pytest.raises(ValueError, match="clip_c"):
        P.parse_loss_spec("dgpo:clip_c=3")


def test_recompute_weights_follow_the_formula_sheet():
    low, high = 0.8, 1.2
    r = np.array([0.5, 0.5, 1.0, 1.5, 1.5, 4.0])
    a = np.array([-1.0, 1.0, 1.0, 1.0, -1.0, -1.0])
    regions = ["LN", "LP", "M", "HP", "HN", "HN"]
    # float64 through the loss zoo on logp = log r: r comes back from exp(log r) (<= eps64 (1 + |ln r|/2))
    # and each weight is a constant, a ratio or a power of it (<= 2 |ln r| ulps more): 8 eps64
    rel, reg = P.recompute_weights(P.parse_loss_spec("grpo"), r, a, 0.2, 0.2)
    assert list(reg) == regions
    assert np.allclose(rel, [0, 1, 1, 0, 1, 0], rtol=8 * EPS64, atol=0)      # dual clip c = 3 zeroes r = 4
    rel, _ = P.recompute_weights(P.parse_loss_spec("cispo"), r, a, 0.2, 0.2)
    assert np.allclose(rel, [low / 0.5, low / 0.5, 1, high / 1.5, high / 1.5, high / 4.0], rtol=8 * EPS64, atol=0)
    rel, _ = P.recompute_weights(P.parse_loss_spec("dgpo:n=2,m=2"), r, a, 0.2, 0.2)
    assert np.allclose(rel, [(0.5 / low) ** 2, 1, 1, (high / 1.5) ** 0.5, 1, 1], rtol=8 * EPS64, atol=0)
    rel, _ = P.recompute_weights(P.parse_loss_spec("sapo:gate=erf,tau_pos=10,tau_neg=12"), r, a, 0.2, 0.2)
    tau = np.where(a > 0, 10.0, 12.0)
    # f' = exp(-u^2 / 2) is sensitive to u = tau (r - 1) (tests/test_gates.py's fprime_rtol), here with
    # r's own round-trip error
    assert np.allclose(rel, np.exp(-tau ** 2 * (r - 1) ** 2 / 2), atol=0,
                       rtol=fprime_rtol("erf", r, tau, EPS64, rel_x=EPS64 * (1 + np.abs(np.log(r)) / 2)))


# ----------------------------------------------------------------------------- reading a run

def test_read_metrics_jsonl_and_tensorboard_agree(run_dir, tmp_path):
    from_jsonl = P.read_metrics(run_dir)
    assert list(from_jsonl["step"]) == sorted(from_jsonl["step"]) and len(from_jsonl) > 1
    tb_only = tmp_path / "tb_only"
    shutil.copytree(run_dir / "tb", tb_only / "tb")
    from_tb = P.read_metrics(tb_only)
    assert list(from_tb["step"]) == list(from_jsonl["step"])
    for key in ("reward/mean", "eur", "entropy", "frac_LN"):
        # TB stores float32: one round-to-nearest of the float64 value, <= eps32 / 2 relative
        assert np.allclose(from_tb[key], from_jsonl[key], rtol=EPS32, atol=0), key


def test_read_metrics_errors_and_torn_last_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        P.read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "eur": 1.0}\n{"step": 2, "eur": 0.5}\n{"step": 3, "eu')
    assert list(P.read_metrics(run)["step"]) == [1, 2]               # a killed run's torn line
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        P.read_metrics(run)
    # a resumed run that re-logged a step keeps the last record
    (run / "metrics.jsonl").write_text('{"step": 1, "eur": 1.0}\n{"step": 1, "eur": 0.25}\n')
    assert list(P.read_metrics(run)["eur"]) == [0.25]


def test_read_tokens_filters_and_validates(run_dir, tmp_path):
    all_tokens = P.read_tokens(run_dir)
    steps = sorted(all_tokens["step"].unique())
    assert len(steps) >= 2
    late = P.read_tokens(run_dir, steps[-1], None)
    assert set(late["step"]) == {steps[-1]}
    last = P.read_tokens(run_dir, last_update_only=True)
    assert (last.groupby("step")["update"].nunique() == 1).all()
    assert (last.groupby("step")["update"].max() == all_tokens.groupby("step")["update"].max()).all()
    with pytest.raises(FileNotFoundError, match="no per-token dumps"):
        P.read_tokens(run_dir, 10_000, None)
    bad = tmp_path / "bad"
    (bad / "tokens").mkdir(parents=True)
    all_tokens.drop(columns=["ratio"]).to_parquet(bad / "tokens" / "step_000001.parquet")
    with pytest.raises(ValueError, match=r"step_000001.parquet: missing column\(s\) ratio"):
        P.read_tokens(bad)


def test_token_dumps_hold_every_response_token_of_each_update(run_dir, second_run_dir):
    """Each dump holds, for every optimizer update of its step, each response token of the main rank's
    sequences: with one rank that is every token the step logged (response_len/mean x samples)."""
    import yaml

    for run, ranks in ((run_dir, 2), (second_run_dir, 1)):
        rollout = yaml.safe_load((run / "config.yaml").read_text())["rollout"]
        samples = rollout["prompts_per_step"] * rollout["group_size"]
        metrics = metrics_by_step(run)
        assert dumped_steps(run) == sorted(metrics)                       # run.token_dump_every=1
        for step in dumped_steps(run):
            tokens = P.read_tokens(run, step, step)
            row = metrics[step]
            # token counts rebuilt from float64 products (a few ulps of ~100): round() absorbs that
            total = round(row["response_len/mean"] * samples)
            assert round(row["tokens_per_s"] * row["time/step"]) == total
            per_update = tokens.groupby("update").size()
            assert list(per_update.index) == list(range(int(row["optimizer_updates"])))
            local = tokens[tokens["update"] == 0]
            assert local["seq"].nunique() == samples // ranks
            for _, seq in local.groupby("seq"):                          # positions 0..len-1 of one response
                assert sorted(seq["pos"]) == list(range(len(seq)))
                assert len(seq) <= row["response_len/max"]
            assert (per_update == len(local)).all()                       # every update saw the same tokens
            if ranks == 1:
                assert len(local) == total
            else:
                assert len(local) <= total


@BOTH_RUNS
def test_dumped_weights_agree_with_the_loss_zoo(which, request):
    """The run's own loss recomputed from (ratio, advantage) gives the dumped rel_weight and region."""
    run_dir = request.getfixturevalue(which)
    tokens = P.read_tokens(run_dir)
    spec = P.run_loss_spec(run_dir, tokens)
    eps_low, eps_high = float(tokens["eps_low"].iloc[0]), float(tokens["eps_high"].iloc[0])
    ratio = tokens["ratio"].to_numpy()
    rel, regions = P.recompute_weights(spec, ratio, tokens["advantage"].to_numpy(), eps_low, eps_high)
    # the trainer forms w / r in float32 (for DGPO a power of r, which rounds at up to ~(n + 1) |ln r|
    # ulps) and dumps float32; the recomputation is float64 from that same float32 ratio:
    # 16 eps32 (1 + |ln r|) of |rel| (measured: 1.4 eps32 on the DGPO run, 0 on GRPO's 0 / 1 weights)
    assert np.allclose(rel, tokens["rel_weight"].to_numpy(), rtol=0,
                       atol=16 * EPS32 * (1 + np.abs(np.log(ratio))) * np.abs(rel))
    assert (regions == tokens["region"].to_numpy()).mean() > 0.999     # float32 ratios at the boundary


# ----------------------------------------------------------------------------- plot_scatter

@BOTH_RUNS
def test_joint_figure_has_log_axes_bounds_and_all_regions(which, request):
    run_dir = request.getfixturevalue(which)
    tokens = P.read_tokens(run_dir)
    fig = plot_scatter.joint_figure(tokens, "run")
    panels = _axes(fig, "joint:")
    assert set(panels) == {"joint:pos", "joint:neg"}
    texts = []
    for name, ax in panels.items():
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        hlines = sorted(round(line.get_ydata()[0], 6) for line in ax.get_lines())
        assert hlines == _bounds(tokens)                              # L and U
        texts += [t.get_text() for t in ax.texts]
        # every plotted token of that sign is in the hexbin
        counts = ax.collections[0].get_array().sum()
        sign = tokens["advantage"] > 0 if name.endswith("pos") else tokens["advantage"] <= 0
        assert counts == int(sign.sum())
    labels = {t.split()[0]: float(t.split()[1].rstrip("%")) for t in texts}
    assert set(labels) == {"M", "LN", "HP", "LP", "HN"}
    for region in ("LN", "HP", "LP", "HN"):
        # the label prints the share with one decimal (<= 0.05 off), plus a few ulps of a float64 <= 100
        assert labels[region] == pytest.approx((tokens["region"] == region).mean() * 100, abs=0.05 + 8 * EPS64 * 100)
    import matplotlib.pyplot as plt

    plt.close(fig)


@BOTH_RUNS
def test_weights_figure_shows_each_loss_weights(which, request):
    import matplotlib.pyplot as plt

    tokens = P.read_tokens(request.getfixturevalue(which))
    specs = [P.parse_loss_spec("grpo"), P.parse_loss_spec("dgpo:n=2,m=2")]
    fig = plot_scatter.weights_figure(tokens, specs, "run", max_points=10**9)
    panels = _axes(fig, "weights:")
    assert len(panels) == 4
    grpo = panels["weights:grpo:ratio"]
    ys = np.concatenate([c.get_offsets()[:, 1] for c in grpo.collections])
    xs = np.concatenate([c.get_offsets()[:, 0] for c in grpo.collections])
    assert len(ys) == len(tokens)
    low, high = _bounds(tokens)
    boundary = ((xs < low) | (xs > high)) & (ys != 1.0)
    assert np.all(ys[boundary] == 0.0)                                # GRPO: clipped tokens get no gradient
    dg = panels["weights:dgpo:n=2,m=2:ratio"]
    for c in dg.collections:
        x, y = c.get_offsets()[:, 0], c.get_offsets()[:, 1]
        # DGPO relative weights stay in [0, 1]: they decay, never diverge (0 only by underflow)
        assert np.all((y >= 0) & (y <= 1 + 1e-6))
    plt.close(fig)


def test_ratios_figure_overlays_runs(run_dir, second_run_dir):
    import matplotlib.pyplot as plt

    sets = [P.read_tokens(run_dir), P.read_tokens(second_run_dir)]
    fig = plot_scatter.ratios_figure(sets, ["a", "b"])
    for name, ax in _axes(fig, "ratios:").items():
        assert ax.get_xscale() == "log"
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[0].startswith("a (") and legend[1].startswith("b (")
        vlines = sorted(round(line.get_xdata()[0], 6) for line in ax.get_lines())
        assert vlines == sorted(set(_bounds(sets[0]) + _bounds(sets[1])))   # each distinct L and U once
        for text, t in zip(legend, sets):
            low, high = _bounds(t)
            pos = t["advantage"] > 0 if name.endswith("pos") else t["advantage"] <= 0
            outside = ((t["ratio"] < low) | (t["ratio"] > high))[pos].mean() * 100
            assert f"n={int(pos.sum())}," in text and f"{outside:.1f}% outside" in text
    plt.close(fig)


def test_plot_scatter_cli_writes_every_format(run_dir, second_run_dir, tmp_path):
    stem = tmp_path / "out" / "scatter"
    first_step = int(P.token_files(run_dir)[1].stem.split("_")[1])   # from the second dump on
    rc = plot_scatter.main([str(run_dir), str(second_run_dir), "--loss", "grpo", "--loss", "sapo_erf",
                            "--out", str(stem), "--format", "png", "svg", "--steps", f"{first_step}:"])
    assert rc == 0
    names = sorted(p.name for p in stem.parent.iterdir())
    expected = [f"scatter_{kind}.{fmt}" for kind in ("weights", "ratios") for fmt in ("png", "svg")]
    expected += [f"scatter_joint_{Path(r).resolve().name}.{fmt}" for r in (run_dir, second_run_dir)
                 for fmt in ("png", "svg")]
    assert names == sorted(expected)
    for p in stem.parent.glob("*.png"):
        _png_is_a_picture(p)
    rc = plot_scatter.main([str(run_dir), "--plots", "weights", "--out", str(tmp_path / "w"), "--format", "pdf"])
    assert rc == 0 and (tmp_path / "w_weights.pdf").read_bytes()[:4] == b"%PDF"


def _run_script(name: str, *args) -> list[str]:
    """Run tools/<name> as a user would; returns the lines it printed (the files it wrote)."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout.split()


def test_plot_scatter_script_writes_next_to_the_run(run_dir, tmp_path):
    """Default STEM <run>/plots/scatter, all three figures (on a private copy of the run)."""
    run = clone_run(run_dir, tmp_path / "run")
    printed = _run_script("plot_scatter.py", run)
    written = sorted((run / "plots").iterdir())
    assert [p.name for p in written] == ["scatter_joint.png", "scatter_ratios.png", "scatter_weights.png"]
    assert sorted(printed) == [str(p) for p in written]
    for p in written:
        _png_is_a_picture(p)


def test_plot_scatter_cli_errors(run_dir, tmp_path, capsys):
    assert plot_scatter.main([str(tmp_path / "missing")]) == 2
    assert "no per-token dumps" in capsys.readouterr().err
    assert plot_scatter.main([str(run_dir), "--plots", "joint,nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert plot_scatter.main([str(run_dir), "--format", "gif"]) == 2


# ----------------------------------------------------------------------------- plot_curves

def test_curves_figure_plots_the_smoothed_metrics(run_dir, second_run_dir):
    import matplotlib.pyplot as plt

    frames = [P.read_metrics(run_dir), P.read_metrics(second_run_dir)]
    metrics = ["reward/mean", "entropy", "eur", "not_logged"]
    fig = plot_curves.curves_figure(frames, ["A", "B"], metrics, smooth=0.6)
    panels = _axes(fig, "curve:")
    assert set(panels) == {"curve:reward/mean", "curve:entropy", "curve:eur"}   # absent metric: no panel
    for metric in ("reward/mean", "eur"):
        lines = {l.get_label(): l for l in panels[f"curve:{metric}"].get_lines() if not l.get_label().startswith("_")}
        for label, df in zip(("A", "B"), frames):
            # hand EMA, independent of P.ema
            acc, norm, want = 0.0, 0.0, []
            for v in df[metric]:
                acc, norm = 0.6 * acc + 0.4 * v, 0.6 * norm + 0.4
                want.append(acc / norm)
            # the same float64 EMA (2 roundings a step, and a division) in another hand: over len(df)
            # steps of values >= 0 that is <= 4 len(df) eps64 relative
            assert np.allclose(lines[label].get_ydata(), want, rtol=4 * len(df) * EPS64, atol=0)
            assert np.array_equal(lines[label].get_xdata(), df["step"].to_numpy(dtype=float))
    plt.close(fig)


def test_plot_curves_script_writes_next_to_the_run(run_dir, tmp_path):
    run = clone_run(run_dir, tmp_path / "run")
    assert _run_script("plot_curves.py", run) == [str(run / "plots" / "curves.png")]
    _png_is_a_picture(run / "plots" / "curves.png")


def test_plot_curves_cli(run_dir, second_run_dir, tmp_path, capsys):
    out = tmp_path / "curves"
    assert plot_curves.main([str(run_dir), str(second_run_dir), "--out", str(out), "--steps", "2:10",
                             "--labels", "grpo", "dgpo"]) == 0
    _png_is_a_picture(out.with_suffix(".png"))
    assert plot_curves.main([str(run_dir), "--metrics", "nothing_here", "--out", str(out)]) == 2
    assert "available" in capsys.readouterr().err
    assert plot_curves.main([str(run_dir), str(second_run_dir), "--labels", "one"]) == 2

"""tools/compare_losses.py: per-loss configs, the train-command template, figures and the table.

For real: the session's second real run (tests/real_runs.py) is trained by this tool, its
--launcher being the deepspeed launcher, and `--plots-only` compares it with the first real run.
What a short real run cannot show cheaply (four losses, six steps, one run crashing) uses a
stand-in train command (given through --train-cmd, as a user would give another launcher) that
reads the generated config with rlengine.config and writes a synthetic run in the RUNDIR.md
format with that config's loss.
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import compare_losses as C  # noqa: E402
from tests.engine_helpers import read_metrics  # noqa: E402

EPS64 = sys.float_info.epsilon                     # torch.finfo(torch.float64).eps


def mean_of_last(values: list[float]) -> "pytest.approx":
    """The tool's pandas mean of the last k logged values against a plain float64 mean: each sum of
    k terms and its division round <= k + 1 times at magnitude max|v|, on both sides."""
    return pytest.approx(sum(values) / len(values), abs=2 * (len(values) + 1) * EPS64 * max(abs(v) for v in values))

FAKE_TRAIN = textwrap.dedent('''
    import argparse, sys
    sys.path.insert(0, {root!r})
    from rlengine.config import load_config
    from tests.test_tools_synthetic import make_synthetic_run
    ap = argparse.ArgumentParser()
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, a.overrides)
    if cfg.loss.name == "aspo":
        sys.exit("simulated crash")
    params = {{k: v for k, v in cfg.loss.params.items() if k in ("gate", "tau_pos", "tau_neg", "n", "m", "clip_c")
              and v is not None}}
    make_synthetic_run(cfg.run.output_dir, cfg.loss.name, params, steps=cfg.run.total_steps,
                       dump_every=cfg.run.token_dump_every, tensorboard=False)
''')


def test_loss_sections():
    label, section = C.loss_section("sapo_erf", "token-mean")
    assert label == "sapo_erf" and section["name"] == "sapo" and section["gate"] == "erf"
    assert section["agg"] == "seq-mean-token-mean"                       # from configs/sapo_erf.yaml
    label, section = C.loss_section("dgpo:n=1,m=4", "token-mean")
    assert label == "dgpo_n1_m4" and section == {"name": "dgpo", "n": 1, "m": 4, "agg": "token-mean"}
    label, section = C.loss_section("sapo:gate=arctan,agg=token-mean", None)
    assert section == {"name": "sapo", "gate": "arctan", "agg": "token-mean"}
    with pytest.raises(ValueError, match="unknown loss"):
        C.loss_section("bogus", None)


def test_train_command_template(tmp_path):
    run = {"label": "grpo", "config": tmp_path / "grpo.yaml", "out_dir": tmp_path / "grpo"}
    cmd = C.train_command(C.DEFAULT_TEMPLATE, run, ["train.lr=1e-5"], "deepspeed --num_gpus 8")
    # the launcher runs the script with its own Python: no interpreter between them
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"] and cmd[3].endswith("rlengine/train.py")
    assert cmd[-3:] == ["--config", str(tmp_path / "grpo.yaml"), "train.lr=1e-5"]
    cmd = C.train_command(C.DEFAULT_TEMPLATE, run, [], "")
    assert cmd[0] == sys.executable and cmd[1].endswith("rlengine/train.py")
    with pytest.raises(ValueError, match="unknown field"):
        C.train_command("{nope}", run, [], "")


def test_compare_end_to_end_with_a_stand_in_trainer(tmp_path, capsys):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN.format(root=str(ROOT)))
    out = tmp_path / "cmp"
    rc = C.main(["--losses", "grpo,dgpo:n=1,m=4,sapo_erf,aspo", "--steps", "6", "--out", str(out),
                 "--set", "run.token_dump_every=2", "--last-k", "3",
                 "--train-cmd", f"{{python}} {fake} --config {{config}} {{overrides}}"])
    assert rc == 1                                                      # aspo "crashed"
    printed = capsys.readouterr()
    assert "failed runs: aspo" in printed.err
    # each generated config is the base config with only the loss / output / steps changed
    base = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    gen = yaml.safe_load((out / "dgpo_n1_m4.yaml").read_text())
    assert gen["loss"] == {"name": "dgpo", "n": 1, "m": 4, "agg": base["loss"]["agg"]}
    assert gen["run"]["total_steps"] == 6 and gen["run"]["output_dir"] == str(out / "dgpo_n1_m4")
    assert {k: v for k, v in gen.items() if k not in ("loss", "run")} == \
        {k: v for k, v in base.items() if k not in ("loss", "run")}
    # the table: final values are the mean of the last 3 logged steps of each run
    rows = {r["label"]: r for r in json.loads((out / "summary.json").read_text())}
    assert set(rows) == {"grpo", "dgpo_n1_m4", "sapo_erf", "aspo"} and "error" in rows["aspo"]
    for label in ("grpo", "dgpo_n1_m4", "sapo_erf"):
        records = [json.loads(x) for x in (out / label / "metrics.jsonl").read_text().splitlines()]
        assert rows[label]["steps"] == 6
        for name, key in (("reward", "reward/mean"), ("EUR", "eur"), ("entropy", "entropy")):
            assert rows[label][name] == mean_of_last([r[key] for r in records[-3:]])
    assert "| grpo | 6 |" in (out / "summary.md").read_text()
    for name in ("compare_curves.png", "compare_ratios.png", "compare_weights.png"):
        assert (out / name).stat().st_size > 10_000, name
    # plots only, nothing rerun: the existing run directories are compared again
    stamp = (out / "grpo" / "metrics.jsonl").stat().st_mtime_ns
    assert C.main(["--losses", "grpo,sapo_erf", "--steps", "6", "--out", str(out), "--plots-only"]) == 0
    assert (out / "grpo" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_bad_override_fails_before_any_run(tmp_path, capsys):
    rc = C.main(["--losses", "grpo", "--out", str(tmp_path / "x"), "--set", "train.lr=-1",
                 "--train-cmd", "false"])
    assert rc == 2 and "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "x" / "grpo.log").exists()


# ----------------------------------------------------------------------------- real runs

def _summary(out: Path) -> dict:
    return {r["label"]: r for r in json.loads((out / "summary.json").read_text())}


def _assert_row_matches_the_run(row: dict, run: Path, last_k: int) -> None:
    records = read_metrics(run)
    assert row["steps"] == records[-1]["step"]
    for name, key in (("reward", "reward/mean"), ("EUR", "eur"), ("entropy", "entropy"), ("s/step", "time/step")):
        assert row[name] == mean_of_last([r[key] for r in records[-last_k:]]), name


def test_compare_trains_a_real_run_through_the_deepspeed_launcher(second_real_run):
    """The session's second real run was made by this tool: `--losses dgpo --steps 2 --launcher
    <deepspeed launcher, 1 slot>` with the TINY overrides as --set (tests/real_runs.py)."""
    run = second_real_run.dir
    out = run.parent
    log = (out / "dgpo.log").read_text()
    assert "deepspeed.launcher.launch" in log and "rlengine/train.py" in log
    generated = yaml.safe_load((out / "dgpo.yaml").read_text())
    assert generated["loss"] == yaml.safe_load((ROOT / "configs" / "dgpo.yaml").read_text())["loss"]
    resolved = yaml.safe_load((run / "config.yaml").read_text())          # what the trainer ran with
    assert resolved["loss"]["name"] == "dgpo" and resolved["loss"]["n"] == 2.0
    assert resolved["run"]["total_steps"] == 2 and resolved["run"]["output_dir"] == str(run)
    assert resolved["reward"]["name"] == "tests.rewards_for_tests:vowel_fraction"   # a --set override
    row = _summary(out)["dgpo"]
    assert row["status"] == "ok"
    _assert_row_matches_the_run(row, run, last_k=2)
    assert "| dgpo | 2 |" in (out / "summary.md").read_text()
    for name in ("compare_curves.png", "compare_ratios.png", "compare_weights.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_plots_only_compares_two_real_runs(run_dir, second_run_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "grpo").symlink_to(run_dir)
    (out / "dgpo").symlink_to(second_run_dir)
    assert C.main(["--losses", "grpo,dgpo", "--out", str(out), "--plots-only", "--last-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| grpo | 3 |" in printed and "| dgpo | 2 |" in printed
    rows = _summary(out)
    _assert_row_matches_the_run(rows["grpo"], run_dir, last_k=2)
    _assert_row_matches_the_run(rows["dgpo"], second_run_dir, last_k=2)
    for name in ("compare_curves.png", "compare_ratios.png", "compare_weights.png"):
        assert (out / name).stat().st_size > 10_000, name

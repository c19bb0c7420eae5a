"""tools/compare_losses.py: per-loss configs, the train-command template, figures and the table.

The train command is a stand-in script (given through --train-cmd, as a user would give another
launcher) that reads the generated config with rlengine.config and writes a synthetic run in the
RUNDIR.md format with that config's loss; the real trainer is run by the engine's own tests.
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
    assert cmd[:3] == ["deepspeed", "--num_gpus", "8"] and cmd[3] == sys.executable
    assert cmd[4].endswith("rlengine/train.py") and cmd[-3:] == ["--config", str(tmp_path / "grpo.yaml"), "train.lr=1e-5"]
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
            assert rows[label][name] == pytest.approx(sum(r[key] for r in records[-3:]) / 3)
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

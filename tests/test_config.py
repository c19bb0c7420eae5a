"""The typed config: YAML + dotted overrides, did-you-mean, type and range errors, loss params."""
import subprocess
import sys

import pytest
import yaml

from rlengine.config import ConfigError, load_config, parse_cli, to_dict, to_yaml


def test_defaults_and_overrides():
    cfg = load_config("configs/default.yaml", ["loss.name=dgpo", "loss.n=2", "rollout.temperature=0.7",
                                                "rollout.stop=['</answer>']", "run.total_steps=3"])
    assert cfg.loss.name == "dgpo" and cfg.loss.params["n"] == 2 and cfg.loss.params["m"] == 2
    assert cfg.rollout.temperature == 0.7 and cfg.rollout.stop == ["</answer>"]
    assert cfg.run.total_steps == 3
    assert cfg.model.path == "embedded"
    # YAML 1.1 reads 1e-5 (no dot) as a string; a float field still takes it
    assert load_config(None, ["train.lr=1e-5"]).train.lr == 1e-5


@pytest.mark.parametrize("override, words", [
    (["rollout.temprature=0.5"], ["rollout.temprature", "did you mean 'temperature'"]),
    (["trian.lr=1e-5"], ["trian", "did you mean 'train'"]),
    (["train.lr=fast"], ["train.lr", "number"]),
    (["train.lr=-1"], ["train.lr", "out of range"]),
    (["rollout.top_p=1.5"], ["rollout.top_p", "out of range"]),
    (["rollout.backend=sglang"], ["rollout.backend", "hf", "vllm"]),
    (["run.total_steps=2.5"], ["run.total_steps", "integer"]),
    (["model.gradient_checkpointing=maybe"], ["model.gradient_checkpointing", "true/false"]),
    (["loss.name=grpoo"], ["loss.name", "did you mean 'grpo'"]),
    (["loss.name=grpo", "loss.n=2"], ["loss.n", "grpo"]),
    (["loss.name=dgpo", "loss.m=0"], ["dgpo", "m"]),
    (["loss.name=sapo", "loss.gate=relu"], ["sapo", "gate", "sigmoid"]),
    (["loss.agg=mean"], ["loss.agg", "token-mean"]),
    (["data.mixture=[{preset: gsm8k, wieght: 1}]"], ["data.mixture.0.wieght", "did you mean 'weight'"]),
    (["rollout.placement=separate"], ["rollout.num_ranks"]),
    (["run.collective_timeout_s=600"], ["run.collective_timeout_s", "rollout.generate_timeout_s (1200)"]),
    (["run.collective_timeout_s=100", "rollout.generate_timeout_s=50"], ["run.collective_timeout_s", "rollout.sync_timeout_s (300)"]),
    (["reward.name=answer_fromat"], ["reward.name", "answer_format"]),
    (["reward.name=no_such_module:fn"], ["reward.name", "no_such_module"]),
    (["data.preset=gsm8"], ["data.preset", "did you mean 'gsm8k'"]),
    (["run.resume=/no/such/ckpt"], ["run.resume", "/no/such/ckpt"]),
])
def test_errors_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/default.yaml", override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_launcher_local_rank_is_accepted():
    cfg, args = parse_cli(["--local_rank=1", "--config", "configs/default.yaml", "loss.name=cispo"])
    assert args.local_rank == 1 and cfg.loss.name == "cispo"


def test_print_round_trips(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlengine.config", "--config", "configs/default.yaml",
                          "loss.name=sapo", "loss.gate=erf", "loss.tau_pos=10"],
                         capture_output=True, text=True, check=True).stdout
    printed = yaml.safe_load(out)
    assert printed["loss"]["gate"] == "erf" and printed["loss"]["tau_pos"] == 10
    f = tmp_path / "resolved.yaml"
    f.write_text(out)
    again = load_config(f)
    assert to_dict(again) == printed
    assert to_yaml(again) == out


def test_cli_error_exit_code():
    r = subprocess.run([sys.executable, "-m", "rlengine.config", "--config", "configs/default.yaml", "train.lr=x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train.lr" in r.stderr

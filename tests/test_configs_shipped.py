"""Every shipped config under configs/ loads, validates, and says what the papers say.

The numbers asserted here are typed from /work/shared/papers.md (and the papers' texts), not read
back from the YAML files, so an edit that drifts from the papers fails.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from rlengine import losses
from rlengine.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PER_LOSS = ["grpo", "cispo", "gppo", "ce_gppo", "aspo", "sapo_sigmoid", "sapo_erf", "sapo_arctan", "sapo_softsign",
            "dgpo"]
GATE_PAPER = ["gate_paper_qwen2.5_7b_erf", "gate_paper_qwen2.5_7b_grpo"]
DGPO_PAPER = {"1.5b": 1.5, "7b": 7.0, "14b": 14.0}
EPS64 = torch.finfo(torch.float64).eps


def all_config_files() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", all_config_files(), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    # the resolved config (what the trainer writes to <out>/config.yaml) is itself a valid config
    resolved = to_dict(cfg)
    tmp = tmp_path / "resolved.yaml"
    tmp.write_text(yaml.safe_dump(resolved))
    assert to_dict(load_config(tmp)) == resolved


def test_the_listed_configs_all_exist():
    names = {p.stem for p in all_config_files()}
    missing = set(PER_LOSS + GATE_PAPER + [f"dgpo_r1_distill_{k}" for k in DGPO_PAPER]) - names
    assert not missing


# ----------------------------------------------------------------------------- per-loss configs

EXPECTED_LOSS = {
    "grpo": ("grpo", {"clip_c": 3.0}),
    "cispo": ("cispo", {}),
    "gppo": ("gppo", {"clip_c": 3.0}),
    "ce_gppo": ("ce_gppo", {"beta1": 0.5, "beta2": 1.0, "clip_c": 10.0}),
    "aspo": ("aspo", {"clip_c": 3.0}),
    "sapo_sigmoid": ("sapo", {"gate": "sigmoid", "tau_pos": 10.0, "tau_neg": 12.0}),
    "sapo_erf": ("sapo", {"gate": "erf", "tau_pos": 10.0, "tau_neg": 12.0}),
    "sapo_arctan": ("sapo", {"gate": "arctan", "tau_pos": 10.0, "tau_neg": 12.0}),
    "sapo_softsign": ("sapo", {"gate": "softsign", "tau_pos": 10.0, "tau_neg": 12.0}),
    "dgpo": ("dgpo", {"n": 2.0, "m": 2.0}),
}


@pytest.mark.parametrize("name", PER_LOSS)
def test_per_loss_config_is_the_default_setup_with_that_loss(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    default = load_config(CONFIGS / "default.yaml")
    loss_name, params = EXPECTED_LOSS[name]
    assert cfg.loss.name == loss_name
    for k, v in params.items():
        assert cfg.loss.params[k] == v, k
    assert cfg.loss.params["eps_low"] == 0.2 and cfg.loss.params["eps_high"] == 0.2
    assert cfg.loss.agg == ("seq-mean-token-mean" if loss_name == "sapo" else "token-mean")
    assert cfg.run.output_dir == f"runs/{name}"
    a, b = to_dict(cfg), to_dict(default)
    for d in (a, b):
        d.pop("loss")
        d["run"].pop("output_dir")
    assert a == b, (f"configs/{name}.yaml drifted from configs/default.yaml outside the loss section: "
                    f"{ {k: (a[k], b[k]) for k in a if a[k] != b[k]} }")


def test_per_loss_configs_cover_every_registered_loss_and_gate():
    names = {load_config(CONFIGS / f"{n}.yaml").loss.name for n in PER_LOSS}
    names |= {load_config([CONFIGS / "default.yaml", f]).loss.name for f in overlay_files()}
    assert names == set(losses.LOSSES)
    gates = {load_config(CONFIGS / f"{n}.yaml").loss.params["gate"] for n in PER_LOSS if n.startswith("sapo_")}
    assert gates == set(losses.GATES)


# ----------------------------------------------------------------------------- loss overlays

def overlay_files() -> list[Path]:
    return sorted((CONFIGS / "losses").glob("*.yaml"))


# Typed from the papers (GSPO sec. 5.1; GMPO sec. 4, clip range (e^-0.4, e^0.4); DPPO as the issue
# names it; ASPO's wider eps for the top-20% entropy tokens from the authors' code).
EXPECTED_OVERLAY = {
    "gspo": ("gspo", "seq-mean-token-mean", {"eps_low": 3e-4, "eps_high": 4e-4}),
    "gspo_token": ("gspo_token", "seq-mean-token-mean", {"eps_low": 3e-4, "eps_high": 4e-4}),
    "gmpo": ("gmpo", "seq-mean-token-mean", {"eps_low": 1 - math.exp(-0.4), "eps_high": math.exp(0.4) - 1}),
    "dppo": ("dppo", "token-mean", {"dppo_type": "binary_tv", "delta_low": 0.2, "delta_high": 0.2, "clip_c": None}),
    "aspo_top_entropy": ("aspo", "token-mean", {"top_entropy_eps": 0.4, "top_entropy_frac": 0.2, "clip_c": 3.0}),
}


def test_every_overlay_is_listed():
    assert {f.stem for f in overlay_files()} == set(EXPECTED_OVERLAY)


@pytest.mark.parametrize("name", sorted(EXPECTED_OVERLAY))
def test_loss_overlay_on_the_default_setup(name):
    """default.yaml + configs/losses/<name>.yaml: the loss of the paper, everything else the default's."""
    cfg = load_config([CONFIGS / "default.yaml", CONFIGS / "losses" / f"{name}.yaml"])
    loss_name, agg, params = EXPECTED_OVERLAY[name]
    assert cfg.loss.name == loss_name and cfg.loss.agg == agg
    for k, v in params.items():
        # the YAML holds repr(1 - e^-0.4) etc., parsed exactly; the expected value here adds libm's exp
        # (<= 1 ulp of e^+-0.4, which is <= 3 ulps of the difference 0.33 / 0.49; the subtraction
        # itself is exact by Sterbenz): 4 eps64
        assert cfg.loss.params[k] == (pytest.approx(v, rel=4 * EPS64) if isinstance(v, float) else v), k
    assert cfg.run.output_dir == f"runs/{name}"
    a, b = to_dict(cfg), to_dict(load_config(CONFIGS / "default.yaml"))
    for d in (a, b):
        d.pop("loss")
        d["run"].pop("output_dir")
    assert a == b


def test_naming_another_loss_starts_from_its_defaults():
    """default.yaml's eps 0.2 must not leak into GSPO (whose clip range is 3e-4 / 4e-4), neither from
    an overlay file nor from a command-line loss.name."""
    for cfg in (load_config(CONFIGS / "default.yaml", ["loss.eps_high=5e-4", "loss.name=gspo"]),
                load_config(CONFIGS / "grpo.yaml", ["loss.name=gspo", "loss.eps_high=5e-4"])):
        assert cfg.loss.name == "gspo" and cfg.loss.agg == "seq-mean-token-mean"
        assert (cfg.loss.params["eps_low"], cfg.loss.params["eps_high"]) == (3e-4, 5e-4)
    same = load_config(CONFIGS / "grpo.yaml", ["loss.name=grpo"])   # the same loss keeps its section
    assert same.loss.params["clip_c"] == 3.0


# ----------------------------------------------------------------------------- the gate paper

@pytest.mark.parametrize("name", GATE_PAPER)
def test_gate_paper_setup(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    world = 8                                                         # 8 x A100
    per_device, grad_accum = 1, 16
    assert cfg.model.path == "Qwen/Qwen2.5-7B-Instruct" and cfg.model.dtype == "bf16"
    assert [(s.preset, s.split, s.weight) for s in cfg.data.mixture] == [("gsm8k", "train", 1.0),
                                                                          ("deepmath", "train", 1.0)]
    assert cfg.rollout.group_size == 8
    assert cfg.data.max_prompt_tokens == 1536 and cfg.rollout.max_new_tokens == 512
    assert cfg.train.micro_batch_size == per_device
    mini = cfg.train.mini_batch_prompts or cfg.rollout.prompts_per_step
    # sequences per optimizer update = per-device batch x accumulation x GPUs = 128
    assert mini * cfg.rollout.group_size == per_device * grad_accum * world == 128
    # the accumulation the trainer derives (train.py): prompts per rank x group / micro batch
    assert (mini // world) * cfg.rollout.group_size // cfg.train.micro_batch_size == grad_accum
    updates_per_step = cfg.train.num_iterations * (cfg.rollout.prompts_per_step // mini)
    assert cfg.train.num_iterations == 2 and updates_per_step == 2
    assert cfg.run.total_steps * updates_per_step == 5000             # optimizer steps
    t = cfg.train
    assert (t.lr, t.lr_schedule, t.warmup_steps, t.min_lr_ratio) == (1e-6, "linear", 0, 0.0)
    assert t.betas == [0.9, 0.999] and t.adam_eps == 1e-8
    assert cfg.reward.name == "answer_format" and cfg.data.system_prompt == "think_answer"
    if name.endswith("_erf"):
        assert cfg.loss.name == "sapo" and cfg.loss.params["gate"] == "erf"
        assert (cfg.loss.params["tau_pos"], cfg.loss.params["tau_neg"]) == (10.0, 12.0)
        assert cfg.loss.agg == "seq-mean-token-mean"
    else:
        assert cfg.loss.name == "grpo" and cfg.loss.params["eps_low"] == cfg.loss.params["eps_high"] == 0.2


def test_gate_paper_switching_the_gate_is_one_override():
    for gate in losses.GATES:
        cfg = load_config(CONFIGS / "gate_paper_qwen2.5_7b_erf.yaml", [f"loss.gate={gate}"])
        assert cfg.loss.params["gate"] == gate


# ----------------------------------------------------------------------------- DGPO

@pytest.mark.parametrize("size", list(DGPO_PAPER))
def test_dgpo_paper_setup(size):
    cfg = load_config(CONFIGS / f"dgpo_r1_distill_{size}.yaml")
    params = DGPO_PAPER[size]
    assert cfg.model.path == f"deepseek-ai/DeepSeek-R1-Distill-Qwen-{size.upper()}"
    assert cfg.model.dtype == "bf16"
    assert cfg.data.preset == "dapo" and "DAPO-Math-17k" in cfg.data.path
    assert cfg.rollout.prompts_per_step == 512 and cfg.train.mini_batch_prompts == 32
    assert cfg.train.num_iterations * cfg.rollout.prompts_per_step // cfg.train.mini_batch_prompts == 16
    assert cfg.rollout.max_new_tokens == 8192
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.train.kl_coef == 0.0 and cfg.train.grad_clip == 1.0
    assert cfg.train.lr_schedule == "constant" and cfg.train.warmup_steps == 0
    assert cfg.run.seed == 42 and cfg.data.seed == 42
    assert cfg.reward.name == "boxed" and cfg.data.system_prompt == "boxed"
    assert cfg.loss.name == "dgpo" and cfg.loss.agg == "token-mean"
    assert cfg.loss.params["eps_low"] == cfg.loss.params["eps_high"] == 0.2
    assert (cfg.loss.params["n"], cfg.loss.params["m"]) == ((2.0, 2.0) if size == "1.5b" else (1.0, 2.0))
    base = load_config(CONFIGS / "dgpo_r1_distill_1.5b.yaml").train.lr
    # the configs write the scaled lr to 5 significant figures (3.2733e-07): a decimal rounding of
    # at most half a unit in the 5th digit, <= 5e-5 relative; float64 adds nothing visible
    assert math.isclose(cfg.train.lr, base * math.sqrt(1.5 / params), rel_tol=0.5 * 10 ** -4)


def test_multinode_hostfile_matches_the_dgpo_mini_batch():
    lines = [ln.split("#")[0].split() for ln in (ROOT / "launch" / "hosts.multinode.example").read_text().splitlines()]
    hosts = [ln for ln in lines if ln]
    assert len(hosts) > 1 and all(h[1].startswith("slots=") for h in hosts)
    world = sum(int(h[1].split("=")[1]) for h in hosts)
    cfg = load_config(CONFIGS / "dgpo_r1_distill_7b.yaml")
    assert cfg.train.mini_batch_prompts % world == 0  # the trainer splits a mini-batch's prompts across ranks

"""Real short training runs of the embedded default, made once per pytest session.

`real_run`     2 ranks through the deepspeed launcher (ZeRO-3 on gloo, HF sampler), the TINY
               overrides of tests/engine_helpers.py (fp32, 12 new tokens, the digit_fraction test
               reward, token dumps every step), GRPO, 3 steps, checkpoints at steps 2 and 3,
               final/ exported. The launcher tests and every tool test read this one run.
`second_real_run`  the same setup with DGPO on 1 rank for 2 steps, groups of 2, on the random
               tiny Llama (tests/conftest.py `tiny_model_dir`: the tool's path, not the model, is
               under test; ~40 s instead of ~120 s), launched by tools/compare_losses.py through
               the deepspeed launcher (the tool's real train command): the second run of the
               overlay and side-by-side figures.
`run_dir` / `second_run_dir`  their output directories (what the tool tests take).

`clone_run(src, dst)` gives a test its own copy to change (e.g. to resume it): files over 1 MiB
(weights, optimizer shards) are hard-linked, which is safe because nothing rewrites them in place,
the rest is copied.

Set RLENGINE_TEST_KEEP_RUNS=DIR to keep the runs in DIR and reuse them in later sessions while
iterating on tool tests (a run is reused only when its recorded recipe is the same); CI never
sets it.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.engine_helpers import REPO, TINY, launcher_prefix, on_tiny_model, read_metrics, run_env, run_training

KEEP_ENV = "RLENGINE_TEST_KEEP_RUNS"
FIRST_STEPS, SECOND_STEPS = 3, 2
FIRST_OVERRIDES = TINY + [f"run.total_steps={FIRST_STEPS}", "run.save_every=2"]
SECOND_OVERRIDES = TINY + ["rollout.group_size=2", "run.save_every=0", "run.export_final=false"]
LINK_ABOVE_BYTES = 1 << 20


@dataclass
class RealRun:
    """One finished training run: its output directory, the folder around it, what it printed."""

    dir: Path
    root: Path
    log: str
    seconds: float
    reused: bool = False


# ----------------------------------------------------------------------------- plumbing

def _root(tmp_path_factory, name: str) -> Path:
    keep = os.environ.get(KEEP_ENV)
    if not keep:
        return tmp_path_factory.mktemp(name)
    root = Path(keep).expanduser().resolve() / name
    root.mkdir(parents=True, exist_ok=True)
    return root


def _reuse(root: Path, recipe: dict) -> RealRun | None:
    """The kept run of an earlier session made with the same recipe ($RLENGINE_TEST_KEEP_RUNS only)."""
    marker = root / "recipe.json"
    if not os.environ.get(KEEP_ENV) or not marker.is_file():
        return None
    kept = json.loads(marker.read_text())
    if kept.get("recipe") != recipe:
        return None
    return RealRun(Path(kept["dir"]), root, kept["log"], kept["seconds"], reused=True)


def _remember(run: RealRun, recipe: dict) -> RealRun:
    if os.environ.get(KEEP_ENV):
        (run.root / "recipe.json").write_text(json.dumps({"recipe": recipe, "dir": str(run.dir), "log": run.log,
                                                          "seconds": run.seconds}))
    return run


def _fresh(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.getsize(src) > LINK_ABOVE_BYTES:
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def clone_run(src: Path, dst: Path) -> Path:
    """A private copy of a run directory: big files hard-linked, small ones copied."""
    shutil.copytree(src, dst, copy_function=_link_or_copy)
    return dst


# ----------------------------------------------------------------------------- the runs

def train_first_run(root: Path) -> RealRun:
    """GRPO, 2 ranks, colocated HF samplers, through the deepspeed launcher."""
    out = root / "run"
    _fresh(root, "run", "recipe.json")
    t0 = time.time()
    r = run_training(root, 2, FIRST_OVERRIDES + [f"run.output_dir={out}"])
    seconds = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-6000:]
    return RealRun(out, root, r.stdout + r.stderr, seconds)


def train_second_run(root: Path, overrides: list[str]) -> RealRun:
    """DGPO (configs/dgpo.yaml's loss section), 1 rank, run by tools/compare_losses.py whose
    --launcher is the deepspeed launcher."""
    out = root / "cmp"
    _fresh(root, "cmp", "recipe.json")
    launcher = " ".join(shlex.quote(x) for x in launcher_prefix(root, 1))
    cmd = [sys.executable, str(REPO / "tools" / "compare_losses.py"), "--losses", "dgpo",
           "--steps", str(SECOND_STEPS), "--out", str(out), "--last-k", "2", "--launcher", launcher]
    for override in overrides:
        cmd += ["--set", override]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    seconds = time.time() - t0
    log = out / "dgpo.log"
    run_log = log.read_text() if log.is_file() else "(no log)"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + run_log[-6000:]
    return RealRun(out / "dgpo", root, r.stdout + r.stderr + run_log, seconds)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> RealRun:
    root = _root(tmp_path_factory, "real_run")
    recipe = {"nproc": 2, "overrides": FIRST_OVERRIDES}
    return _reuse(root, recipe) or _remember(train_first_run(root), recipe)


@pytest.fixture(scope="session")
def second_real_run(tmp_path_factory, tiny_model_dir) -> RealRun:
    root = _root(tmp_path_factory, "second_real_run")
    overrides = SECOND_OVERRIDES + on_tiny_model(tiny_model_dir)
    recipe = {"nproc": 1, "losses": "dgpo", "steps": SECOND_STEPS, "overrides": overrides}
    return _reuse(root, recipe) or _remember(train_second_run(root, overrides), recipe)


@pytest.fixture(scope="session")
def run_dir(real_run) -> Path:
    """The run directory the tool tests read (the real GRPO run)."""
    return real_run.dir


@pytest.fixture(scope="session")
def second_run_dir(second_real_run) -> Path:
    """A second real run with another loss (DGPO) for the overlay / side-by-side plots."""
    return second_real_run.dir


def dumped_steps(run: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run / "tokens").glob("step_*.parquet"))


def metrics_by_step(run: Path) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run)}

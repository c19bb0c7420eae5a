"""Atomic checkpoints and resume.

Layout under `<output_dir>/checkpoints/`:

    step_000010/            a complete checkpoint (only ever appears by an atomic rename)
        ds/                 DeepSpeed engine state: ZeRO-3 shards, optimizer, scheduler
        rank_<r>.pt         RNG states of rank r
        state.json          step, data position, counters (written last, fsync'ed)
        config.yaml         the resolved config of the run
    latest                  name of the newest complete checkpoint (replaced atomically, last)
    .tmp-step_000020/       a save in progress; never picked by resume, removed at start-up

Protocol (every rank calls `save`; rank 0 does the file-system commits):
    1. rank 0 creates `.tmp-step_N/`; barrier
    2. every rank writes its DeepSpeed shards and RNG state into it; barrier
    3. rank 0 writes state.json + config.yaml, fsyncs every file and directory,
       renames `.tmp-step_N` -> `step_N`, fsyncs the parent, then replaces `latest`
    4. rank 0 deletes the oldest complete checkpoints beyond `keep_last`; barrier
A kill -9 at any moment leaves either the previous `latest` (step N absent or still `.tmp-`)
or the new one, never a half-written checkpoint that resume would pick.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "state.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (directories last, so entries are durable)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers only, so that they load with
    `torch.load(weights_only=True)` (no pickle of arbitrary objects)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])


class CheckpointManager:
    """Saves and finds complete checkpoints. `barrier` synchronises the ranks (no-op for 1 rank)."""

    def __init__(self, root: str | Path, keep_last: int, rank: int, barrier: Callable[[], None]):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.barrier = barrier

    # ------------------------------------------------------------------ finding
    @staticmethod
    def find_complete(root: str | Path) -> list[Path]:
        """Complete checkpoint dirs under `root`, oldest first (a dir without state.json is not complete)."""
        root = Path(root)
        if not root.is_dir():
            return []
        found = []
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def complete_checkpoints(self) -> list[Path]:
        return self.find_complete(self.root)

    def drop_after(self, step: int) -> None:
        """Remove the complete checkpoints of steps after `step` (rank 0, at start-up): after a resume
        from an older checkpoint they belong to an abandoned branch, and pruning by step number
        would otherwise keep them and delete the new run's. `latest` is pointed back at `step`."""
        if self.rank != 0:
            return
        later = [p for p in self.complete_checkpoints() if int(STEP_DIR.match(p.name).group(1)) > step]
        if not later:
            return
        for p in later:
            shutil.rmtree(p, ignore_errors=True)
        kept = self.complete_checkpoints()
        if kept:
            atomic_write_text(self.root / "latest", kept[-1].name)
        elif (self.root / "latest").exists():
            (self.root / "latest").unlink()

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer if it is valid, else a scan."""
        pointer = self.root / "latest"
        if pointer.is_file():
            cand = self.root / pointer.read_text().strip()
            if (cand / STATE_FILE).is_file():
                return cand
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def clean_stale(self) -> None:
        """Remove saves that were interrupted (rank 0, at start-up, before anyone saves)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.glob(".tmp-step_*"):
                shutil.rmtree(p, ignore_errors=True)
        self.barrier()

    # ------------------------------------------------------------------ saving
    def save(self, step: int, engine, state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        name = f"step_{step:06d}"
        tmp = self.root / f".tmp-{name}"
        final = self.root / name
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        engine.save_checkpoint(str(tmp / "ds"), tag="ckpt")
        torch.save(rng_state(), tmp / f"rank_{self.rank}.pt")
        self.barrier()
        if self.rank == 0:
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
            fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. after resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_path(self.root)
            atomic_write_text(self.root / "latest", name)
            for old in self.complete_checkpoints()[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    # ------------------------------------------------------------------ loading
    def load(self, path: str | Path, engine) -> dict:
        """Collective: restores engine (weights, optimizer, scheduler) and this rank's RNG.
        Returns the checkpoint's state dict."""
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete rlengine checkpoint (no {STATE_FILE})")
        load_path, _ = engine.load_checkpoint(str(path / "ds"), tag="ckpt")
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / 'ds'}")
        rank_file = path / f"rank_{self.rank}.pt"
        if rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=True))
        return json.loads((path / STATE_FILE).read_text())

"""A JIT build lock left by an interrupted launch must not hang later launches (issue: 8 minutes of a
silent idle run). Unit tests of the detection, and one real launch through the deepspeed launcher
whose torch-extension cache holds such a lock."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlengine.runtime import (NETWORK_LOCK_GRACE_S, clear_stale_build_locks, extension_build_locks,
                              filesystem_type, lock_holders)
from tests.engine_helpers import TINY, on_tiny_model, read_metrics, run_training


def make_lock(root: Path, op: str, age_s: float = 0.0) -> Path:
    lock = root / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    if age_s:
        t = time.time() - age_s
        os.utime(lock, (t, t))
    return lock


def test_a_lock_nobody_holds_is_removed_and_named(tmp_path):
    lock = make_lock(tmp_path, "fused_adam", age_s=5)
    assert extension_build_locks(tmp_path) == [lock]
    lines = clear_stale_build_locks(tmp_path)
    assert not lock.exists()
    assert len(lines) == 1 and str(lock) in lines[0] and "stale" in lines[0]
    assert clear_stale_build_locks(tmp_path) == []


def test_a_lock_a_live_builder_holds_is_kept(tmp_path):
    """torch's FileBaton keeps the lock open while it builds: that builder is alive."""
    lock = make_lock(tmp_path, "deepspeed_shm_comm")
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; fd = os.open({str(lock)!r}, os.O_RDONLY); "
                               "print('ok', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        assert lock_holders(lock) == [holder.pid]
        assert clear_stale_build_locks(tmp_path) == [] and lock.exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert lock_holders(lock) == []
    assert clear_stale_build_locks(tmp_path) and not lock.exists()


def test_network_filesystems_get_a_grace_period(tmp_path, monkeypatch):
    mounts = f"server:/home {tmp_path} nfs4 rw 0 0\n/dev/vda / ext4 rw 0 0\n"
    assert filesystem_type(tmp_path / "x", mounts) == "nfs4"
    assert filesystem_type("/usr", mounts) == "ext4"
    import rlengine.runtime as runtime

    monkeypatch.setattr(runtime, "filesystem_type", lambda path, mounts=None: "nfs4")
    young = make_lock(tmp_path, "fused_adam", age_s=30)
    lines = clear_stale_build_locks(tmp_path)
    assert young.exists() and len(lines) == 1 and "remove it" in lines[0] and str(young) in lines[0]
    clear_stale_build_locks(tmp_path, now=time.time() + NETWORK_LOCK_GRACE_S)
    assert not young.exists()


def test_a_launch_with_a_stale_lock_in_its_cache_trains(tmp_path, monkeypatch, tiny_model_dir):
    """The real thing: a copy of this machine's torch-extension cache with a lock left in the build
    directories of the ops a CPU launch JIT-loads (shm comm, CPU Adam), as a launch killed during
    its first build leaves them. Without the check this run waits for a lock for ever (seen: the
    timeout below then fails the test)."""
    from torch.utils.cpp_extension import get_default_build_root

    # With TORCH_EXTENSIONS_DIR set, torch builds each op in <dir>/<op> (no python/cpu tag level):
    # copy this machine's built ops there so that nothing is rebuilt, then leave the locks.
    cache = tmp_path / "torch_extensions"
    default = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    built = default if os.environ.get("TORCH_EXTENSIONS_DIR") else default / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    if built.is_dir():
        shutil.copytree(built, cache)
    locks = []
    for op in ("deepspeed_shm_comm", "fused_adam"):    # the ops a CPU launch JIT-loads
        (cache / op).mkdir(parents=True, exist_ok=True)
        locks.append(cache / op / "lock")
        locks[-1].touch()
    out = tmp_path / "run"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))     # run_training passes the environment on
    r = run_training(tmp_path, 1, TINY + on_tiny_model(tiny_model_dir) + [f"run.output_dir={out}", "run.total_steps=1", "run.export_final=false",
                                          "data.system_prompt=none", "run.token_dump_every=0"], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    log = r.stdout + r.stderr
    for lock in locks:
        assert f"removed the stale build lock {lock}" in log
        assert not lock.exists()
    assert [row["step"] for row in read_metrics(out)] == [1]

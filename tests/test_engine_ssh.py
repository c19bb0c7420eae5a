"""Slow end-to-end runs: kill -9 (also in the middle of a checkpoint save) and resume; the plain
`deepspeed --hostfile` launch through a real sshd on loopback. Run with `pytest -m slow`."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.engine_helpers import REPO, TINY, free_port, launch_cmd, read_metrics, run_env, run_training

pytestmark = pytest.mark.slow


def _start(tmp, overrides, script="rlengine/train.py"):
    log = open(tmp / "run.log", "a")
    return subprocess.Popen(launch_cmd(tmp, 2, overrides, script=script), cwd=REPO, env=run_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_all(proc):
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both ranks
    proc.wait()
    time.sleep(1)


def _wait_for(pred, proc, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill9_and_resume(tmp_path):
    out = tmp_path / "run"
    overrides = TINY + [f"run.output_dir={out}", "run.total_steps=7", "run.save_every=2", "run.token_dump_every=0"]
    # 1. kill -9 during normal training, after the step-4 checkpoint and before the step-6 one
    proc = _start(tmp_path, overrides)
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(read_metrics(out)) >= 5, proc, 900, "step 5")
    _kill_all(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    # 2. resume; kill -9 again while the step-6 checkpoint is being written
    proc = _start(tmp_path, overrides + ["run.resume=auto"], script="tests/hooks/train_slow_save.py")
    _wait_for(lambda: any((out / "checkpoints").glob(".tmp-step_000006")), proc, 900, "the step-6 save")
    time.sleep(2)
    _kill_all(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not (out / "checkpoints" / "step_000006").exists()
    # 3. resume to the end
    proc = _start(tmp_path, overrides + ["run.resume=auto"])
    assert proc.wait(timeout=1200) == 0, (tmp_path / "run.log").read_text()[-5000:]
    log = (tmp_path / "run.log").read_text()
    assert log.count("resumed from") >= 2 and "step_000004" in log
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 8))       # no gap, no duplicate
    # keep_last=2 leaves step 6 (re-saved after the mid-save kill) and step 7
    saved = json.loads((out / "checkpoints" / "step_000006" / "state.json").read_text())["data"]
    assert saved["draws"] == 6 * 2                                 # 2 prompts per step
    assert [r["data/draws"] for r in rows] == [2 * s for s in range(1, 8)]   # continued, not restarted
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000007"


@pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
                    reason="needs openssh-server (apt-get install openssh-server)")
def test_plain_hostfile_launch_through_sshd(tmp_path):
    """`deepspeed --hostfile hosts rlengine/train.py`, no --no_ssh: the launcher's ssh check and the
    multi-node code path go through a real sshd on 127.0.0.1 with a throwaway key."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    d = tmp_path / "ssh"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin yes\nStrictModes no\nPasswordAuthentication no\nUsePAM no\nPidFile none\n"
        f"SetEnv PATH={os.environ['PATH']}\n")
    (d / "ssh_config").write_text(
        f"Host localhost 127.0.0.1\n  Port {port}\n  IdentityFile {d / 'user_key'}\n  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile {d / 'known_hosts'}\n  BatchMode yes\n")
    # `ssh` on PATH for the launcher: the real client, pointed at the throwaway config
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d / 'ssh_config'} \"$@\"\n")
    (bindir / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    try:
        time.sleep(1)
        env = run_env()
        env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
        check = subprocess.run(["ssh", "localhost", "hostname"], env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        out = tmp_path / "run"
        # the README's plain form, literally: the `deepspeed` script and the shipped launch/hosts
        cmd = [shutil.which("deepspeed", path=env["PATH"]) or "deepspeed", "--hostfile", "launch/hosts",
               "--master_port", str(free_port()), "rlengine/train.py", "--config", "configs/default.yaml",
               *TINY, f"run.output_dir={out}", "run.total_steps=2"]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        assert [x["step"] for x in read_metrics(out)] == [1, 2]
        assert "--no_ssh" not in r.stdout + r.stderr   # the ssh path, not the one-box form
        daemon.kill()
        sshd_log = daemon.communicate(timeout=30)[1].decode(errors="replace")
        # our own check above, then the launcher's ssh check of the hostfile's host
        assert sshd_log.count("Accepted publickey") >= 2, sshd_log[-2000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()

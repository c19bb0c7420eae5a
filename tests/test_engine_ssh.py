"""The plain `deepspeed --hostfile` launch through a real sshd on loopback (openssh-server: installed by
`tools/install.sh --tests`; skipped with the reason where it is missing). kill -9 and resume, also in
the middle of a checkpoint save, are in tests/test_engine_resume.py."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.engine_helpers import REPO, TINY, free_port, on_tiny_model, read_metrics, run_env
from tests.netns_hosts import write_ssh_setup


@pytest.mark.skipif(shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
                    reason="needs openssh-server (bash tools/install.sh --tests, or apt-get install openssh-server)")
def test_plain_hostfile_launch_through_sshd(tmp_path, tiny_model_dir):
    """`deepspeed --hostfile hosts rlengine/train.py`, no --no_ssh: the launcher's ssh check and the
    multi-node code path go through a real sshd on 127.0.0.1 with a throwaway key. The random tiny
    Llama of tests/conftest.py: the launch path does not depend on the model."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    keys = write_ssh_setup(tmp_path, [("localhost 127.0.0.1", "127.0.0.1", free_port())])
    bindir = tmp_path / "bin"
    daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(keys / "sshd_0")], stderr=subprocess.PIPE)
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
               *TINY, *on_tiny_model(tiny_model_dir), f"run.output_dir={out}", "run.total_steps=2"]
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

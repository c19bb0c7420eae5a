"""Two nodes for real: network-namespace hosts with their own sshd (tests/netns_hosts.py), the
deepspeed launcher's multi-node path (pdsh over ssh), gloo across the veth link.

  * the README's literal command, with what the README says to set (~/.deepspeed_env);
  * the same command without it: the ranks stop at once naming what to set, instead of one rank
    failing and the other hanging for DeepSpeed's 30-minute start-up timeout;
  * `rlengine train --hostfile`, which checks the hosts and picks the interface itself, in the
    separate placement: the trainer on host 1, a vLLM rollout rank on host 2, the weight
    broadcast crossing the link with its checksum and probe;
  * host 2's link taken down mid-run: the job ends within the stated bound, and resumes.

The random tiny Llama of tests/conftest.py: what is under test is the launch and the network.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.engine_helpers import REPO, TINY, fp32_logprob_tol, free_port, on_tiny_model, read_metrics, run_env
from tests.netns_hosts import netns_hosts, unavailable

WHY_NOT = unavailable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")

FAST = TINY + ["run.token_dump_every=0", "run.tensorboard=false", "data.system_prompt=none", "run.export_final=false"]
RUN_TIMEOUT_S = 600


def _env(hosts) -> dict:
    env = dict(hosts.env)
    env["PYTHONPATH"] = run_env()["PYTHONPATH"]       # exported to every node by the launcher (PYTHON*)
    env.pop("OMP_NUM_THREADS", None)
    return env


def _deepspeed(hosts, overrides: list[str]) -> list[str]:
    """The README's command: deepspeed --hostfile FILE rlengine/train.py --config ... overrides."""
    return [shutil.which("deepspeed") or "deepspeed", "--hostfile", hosts.hostfile(slots=1),
            "--master_port", str(free_port()), "rlengine/train.py", "--config", "configs/default.yaml", *overrides]


def _world(out) -> list[tuple]:
    return [(w["rank"], w["role"], w["address"]) for w in json.loads((out / "world.json").read_text())]


def test_readme_command_trains_across_two_hosts(tmp_path, tiny_model_dir):
    with netns_hosts(tmp_path / "hosts", 2) as hosts:
        (tmp_path / "hosts" / "home" / ".deepspeed_env").write_text(f"GLOO_SOCKET_IFNAME={hosts.ifname}\n")
        out = tmp_path / "run"
        r = hosts.run(1, _deepspeed(hosts, FAST + on_tiny_model(tiny_model_dir) + [
            f"run.output_dir={out}", "run.total_steps=2"]), timeout=RUN_TIMEOUT_S, cwd=REPO, env=_env(hosts))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        # one trainer rank on each host: ZeRO-3 partitions and gradients crossed the link
        assert _world(out) == [(0, "trainer", hosts.addresses[0]), (1, "trainer", hosts.addresses[1])]
        assert [x["step"] for x in read_metrics(out)] == [1, 2]
        assert all(x["sync/checksum_ok"] == 1.0 for x in read_metrics(out))


def test_without_an_interface_every_rank_says_what_to_set(tmp_path, tiny_model_dir):
    """This machine's name resolves to a loopback address inside the hosts (as Debian writes it):
    gloo would advertise it. Measured before the check: host 1's rank failed in seconds and host
    2's hung with no message."""
    with netns_hosts(tmp_path / "hosts", 2) as hosts:
        out = tmp_path / "run"
        t0 = time.monotonic()
        r = hosts.run(1, _deepspeed(hosts, FAST + on_tiny_model(tiny_model_dir) + [
            f"run.output_dir={out}", "run.total_steps=2"]), timeout=RUN_TIMEOUT_S, cwd=REPO, env=_env(hosts))
        took = time.monotonic() - t0
        assert r.returncode != 0
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "rlengine: network set-up:" in ln]
        assert lines, r.stdout[-3000:] + r.stderr[-3000:]
        assert "resolves to 127.0.1.1" in lines[0] and "set run.socket_ifname=<interface>" in lines[0]
        assert f"{hosts.ifname} {hosts.addresses[0]}" in lines[0] or f"{hosts.ifname} {hosts.addresses[1]}" in lines[0]
        print(f"measured: the job stopped {took:.1f} s after its launch")   # pytest -s
        assert took < 120, took                  # start-up (~40 s here), not DeepSpeed's 30-minute timeout


def _rlengine_train(hosts, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlengine", "train", "--hostfile", hosts.hostfile(slots=1),
            "--config", "configs/default.yaml", *overrides]


SEPARATE = ["rollout.placement=separate", "rollout.num_ranks=1"]


@pytest.mark.vllm
def test_rlengine_train_puts_the_trainer_and_a_vllm_rollout_rank_on_two_hosts(tmp_path, tiny_model_dir):
    pytest.importorskip("vllm")
    with netns_hosts(tmp_path / "hosts", 2) as hosts:
        out = tmp_path / "run"
        r = hosts.run(1, _rlengine_train(hosts, FAST + on_tiny_model(tiny_model_dir) + SEPARATE + [
            "rollout.backend=vllm", "rollout.vllm_kv_cache_gb=0.25", f"run.output_dir={out}", "run.total_steps=2"]),
            timeout=RUN_TIMEOUT_S, cwd=REPO, env=_env(hosts))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        assert f"run.socket_ifname={hosts.ifname}" in r.stdout           # picked by the host check
        assert _world(out) == [(0, "trainer", hosts.addresses[0]), (1, "rollout", hosts.addresses[1])]
        rows = read_metrics(out)
        assert [x["step"] for x in rows] == [1, 2]
        for row in rows:                     # host 2's vLLM generated, and holds the weights host 1 sent
            assert row["sync/checksum_ok"] == 1.0 and row["sync/bytes"] > 0
            assert row["sync/probe_abs_diff"] < fp32_logprob_tol()
        assert "(Worker pid=" in r.stdout + r.stderr                   # vLLM's worker generated


def test_rlengine_train_names_a_host_it_cannot_reach(tmp_path):
    with netns_hosts(tmp_path / "hosts", 2) as hosts:
        hostfile = tmp_path / "hosts3"
        hostfile.write_text("rlnode1 slots=1\nrlnode2 slots=1\nrlnode9 slots=1\n")
        r = hosts.run(1, [sys.executable, "-m", "rlengine", "train", "--hostfile", str(hostfile), "--config",
                          "configs/default.yaml"], timeout=120, cwd=REPO, env=_env(hosts))
        assert r.returncode == 2
        assert "rlengine: host 'rlnode9' of the hostfile does not answer ssh without a prompt" in r.stderr


LINK_DOWN_BOUND_S = 20 + 15 + 30     # run.collective_timeout_s + ssh keep-alive (3 x 5 s) + slack


def test_a_node_whose_link_drops_ends_the_job_and_resume_continues(tmp_path, tiny_model_dir):
    """Host 2's interface goes down after step 2's checkpoint: no reset reaches host 1, so its
    rank waits in a collective until run.collective_timeout_s (20 s here), says so and exits; the
    launcher's ssh to host 2 gives up by its keep-alives (rlengine train sets them)."""
    with netns_hosts(tmp_path / "hosts", 2) as hosts:
        out = tmp_path / "run"
        overrides = FAST + on_tiny_model(tiny_model_dir) + [
            f"run.output_dir={out}", "run.total_steps=6", "run.save_every=1", "run.keep_last=1",
            "rollout.generate_timeout_s=10", "rollout.sync_timeout_s=10", "run.collective_timeout_s=20"]
        log = open(tmp_path / "job.log", "w")
        job = hosts.popen(1, _rlengine_train(hosts, overrides), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
        latest = out / "checkpoints" / "latest"
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not (latest.is_file() and latest.read_text().strip() >= "step_000002"):
                assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.log").read_text()[-4000:]
                time.sleep(0.2)
            hosts.link(2, up=False)
            t0 = time.monotonic()
            try:
                job.wait(timeout=LINK_DOWN_BOUND_S + 120)
            except subprocess.TimeoutExpired:
                pytest.fail("the job did not end after host 2's link dropped:\n" + (tmp_path / "job.log").read_text()[-4000:])
            took = time.monotonic() - t0
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)          # the launcher, pdsh and its ssh clients
                job.wait()
            log.close()
        text = (tmp_path / "job.log").read_text()
        assert job.returncode != 0
        print(f"measured: the job ended {took:.1f} s after host 2's link went down")   # pytest -s
        assert took <= LINK_DOWN_BOUND_S, (took, text[-3000:])
        line = next((ln for ln in text.splitlines() if "rlengine: training stopped: rank 0 on" in ln), "")
        assert "a collective with the other ranks failed" in line, text[-3000:]
        hosts.link(2, up=True)
        done = read_metrics(out)[-1]["step"]
        assert done < 6
        r = hosts.run(1, _rlengine_train(hosts, overrides + ["run.resume=auto"]), timeout=RUN_TIMEOUT_S, cwd=REPO,
                      env=_env(hosts))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        assert [x["step"] for x in read_metrics(out)] == [1, 2, 3, 4, 5, 6]

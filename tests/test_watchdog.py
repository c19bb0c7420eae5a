"""Deadlines (rlengine/watchdog.py): a guarded wait that overruns, or whose part dies, ends the
process with one line; one that finishes in time leaves no trace. Timing bounds here are wall
clock on a loaded 2-core box: each allows the poll interval plus 2 s of scheduling slack."""
from __future__ import annotations

import subprocess
import sys
import time

from rlengine.watchdog import EXIT_FAULT, deadline

SLACK_S = 2.0


def test_a_wait_that_finishes_in_time_leaves_no_trace():
    faults = []
    with deadline("sampler generate", 5.0, "rollout.generate_timeout_s", on_fault=faults.append, poll_s=0.05):
        time.sleep(0.2)
    time.sleep(0.3)                      # the watcher has stopped: nothing fires after the block
    assert faults == []


def test_an_overrun_names_the_wait_and_the_setting():
    faults = []
    t0 = time.monotonic()
    with deadline("sampler generate (vllm)", 0.5, "rollout.generate_timeout_s", on_fault=faults.append, poll_s=0.05):
        while not faults and time.monotonic() - t0 < 10:
            time.sleep(0.02)
    took = time.monotonic() - t0
    assert faults == ["sampler generate (vllm) did not finish within 0.5 s (rollout.generate_timeout_s)"]
    assert 0.5 <= took <= 0.5 + 0.05 + SLACK_S


def test_a_dead_part_is_reported_before_the_deadline():
    faults, state = [], {"dead": False}

    def health():
        return "the spawned vLLM engine process 4242 is gone (exit code -9)" if state["dead"] else None

    t0 = time.monotonic()
    with deadline("sampler generate (vllm)", 600, "rollout.generate_timeout_s", check=health,
                  on_fault=faults.append, poll_s=0.05):
        time.sleep(0.2)
        state["dead"] = True
        while not faults and time.monotonic() - t0 < 10:
            time.sleep(0.02)
    assert faults == ["sampler generate (vllm): the spawned vLLM engine process 4242 is gone (exit code -9)"]
    assert time.monotonic() - t0 <= 0.2 + 0.05 + SLACK_S


HUNG = """
import threading, time
from rlengine.watchdog import deadline
with deadline("reward scoring", 0.5, "reward.timeout_s", poll_s=0.05):
    threading.Event().wait()          # blocks for ever, as a rank inside a dead peer's collective
"""


def test_by_default_the_process_ends_with_one_line_and_exit_code_5():
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", HUNG], capture_output=True, text=True, timeout=60,
                       env={"RANK": "3", "PATH": "/usr/bin:/bin"} | _pythonpath())
    assert r.returncode == EXIT_FAULT == 5, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("rlengine:")]
    assert len(lines) == 1
    assert lines[0].startswith("rlengine: training stopped: rank 3 on ")
    assert lines[0].endswith(": reward scoring did not finish within 0.5 s (reward.timeout_s)")
    assert time.monotonic() - t0 < 30           # python start-up + 0.5 s, far from "for ever"


def _pythonpath() -> dict:
    import os
    from pathlib import Path

    return {"PYTHONPATH": str(Path(__file__).resolve().parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_call_that_raises_because_its_part_died_reports_the_death():
    faults = []
    try:
        with deadline("sampler generate (vllm)", 600, "rollout.generate_timeout_s",
                      check=lambda: "the spawned vLLM engine process 7 is gone (exit code -9)",
                      on_fault=faults.append, poll_s=60):
            raise RuntimeError("EngineDeadError")
    except RuntimeError:
        pass
    assert faults == ["sampler generate (vllm): the spawned vLLM engine process 7 is gone (exit code -9)"]


def test_collective_failures_are_told_from_other_errors():
    from rlengine.watchdog import collective_failure

    # as torch 2.13 raised them here: a killed peer, and a ZeRO-3 gather past the group's timeout
    died = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
                        "by peer [127.0.0.1]:17301. This is typically caused by a remote worker crashing.")
    assert collective_failure(died) == "Connection closed by peer [127.0.0.1]:17301."
    assert collective_failure(RuntimeError("Application timeout caused pair closure")) == \
        "Application timeout caused pair closure"
    assert collective_failure(RuntimeError("CUDA out of memory")) is None
    assert collective_failure(ValueError("gloo")) is None


def test_a_check_that_raises_is_reported_once_not_lost():
    faults = []

    def broken():
        raise OSError("no such process table")

    t0 = time.monotonic()
    with deadline("sampler generate (vllm)", 600, "rollout.generate_timeout_s", check=broken,
                  on_fault=faults.append, poll_s=0.05):
        while not faults and time.monotonic() - t0 < 10:
            time.sleep(0.02)
    assert faults == ["sampler generate (vllm): its health check failed (OSError: no such process table)"]

"""Deadlines for the waits that can hang a run, and the one way a rank stops on a fault.

A rank blocked in C code (vLLM's client waiting for a dead engine, a gloo collective whose peer
hangs) cannot be interrupted by an exception from Python. So a guarded wait gets a watcher thread:
when the wait overruns its deadline, or a part it depends on dies (the spawned vLLM engine), the
watcher prints one line naming the rank, the host and what failed, and ends the process with
EXIT_FAULT. The deepspeed launcher then stops the host's other ranks (it ends every rank as soon
as one exits non-zero); ranks on other hosts see their next collective fail, at once when the
connection is reset, or after `run.collective_timeout_s` when the link is down.

    with deadline("sampler generate", cfg.rollout.generate_timeout_s, "rollout.generate_timeout_s",
                  check=sampler.health):
        gen = sampler.generate(...)

Exit codes of rlengine/train.py: 2 config error, 3 training stopped (push not verified, non-finite
steps), 4 a broken reward, 5 a fault (a deadline passed, a part died, a collective failed).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

EXIT_FAULT = 5
# what torch's gloo / NCCL errors say (RuntimeError, not DistError, for gloo in torch 2.13)
COLLECTIVE_ERRORS = ("gloo", "NCCL", "ProcessGroup", "pair closure", "Connection closed by peer",
                     "Connection reset by peer", "Timed out waiting")
POLL_S = 1.0


def where() -> str:
    """'rank R on HOST' for this process (RANK as set by the launcher)."""
    return f"rank {os.environ.get('RANK', '0')} on {socket.gethostname()}"


def stop_now(message: str, code: int = EXIT_FAULT) -> None:
    """Print `rlengine: training stopped: <where>: <message>` and end this process at once (no
    clean-up that could block again: the launcher and the operating system reclaim the rest)."""
    print(f"rlengine: training stopped: {where()}: {message}", file=sys.stderr, flush=True)
    os._exit(code)


def collective_failure(error: BaseException) -> str | None:
    """What a failed collective says, in one line, or None for any other error. torch raises
    gloo's errors as plain RuntimeError, seen here: '[.../gloo/transport/tcp/pair.cc:553]
    Connection closed by peer [10.0.0.2]:17301 ...' (a peer died), 'Application timeout caused
    pair closure' (a ZeRO-3 gather past the group's timeout, the peer's link down)."""
    import torch.distributed as dist

    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    is_dist = isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError) and any(k in text for k in COLLECTIVE_ERRORS))
    if not is_dist:
        return None
    if text.startswith("[") and "] " in text:       # drop the C++ source location
        text = text.split("] ", 1)[1]
    return text.split(" This is typically caused")[0]


@contextmanager
def deadline(what: str, seconds: float, setting: str, check: Callable[[], str | None] | None = None,
             poll_s: float = POLL_S, on_fault: Callable[[str], None] = stop_now) -> Iterator[None]:
    """Guard the block: if it runs longer than `seconds` (the config key `setting` says so), or
    `check()` returns a reason (polled every `poll_s`), call `on_fault(message)`, which by default
    ends the process (tests pass a recorder)."""
    done = threading.Event()
    fired = threading.Lock()          # one verdict per block: the watcher's or the block's own

    def fault(message: str) -> None:
        if fired.acquire(blocking=False):
            on_fault(message)

    def reason_now() -> str | None:
        try:
            return check() if check is not None else None
        except Exception as e:        # a broken check must not silently end the deadline
            return f"its health check failed ({type(e).__name__}: {e})"

    def watch() -> None:
        end = time.monotonic() + seconds
        while not done.wait(max(0.0, min(poll_s, end - time.monotonic()))):
            reason = reason_now()
            if reason is not None:
                message = f"{what}: {reason}"
            elif time.monotonic() >= end:
                message = f"{what} did not finish within {seconds:g} s ({setting})"
            else:
                continue
            with finish:
                if not done.is_set():   # the block may have ended while the check ran
                    fault(message)
            return

    finish = threading.Lock()
    watcher = threading.Thread(target=watch, name=f"rlengine-deadline: {what}", daemon=True)
    watcher.start()
    try:
        yield
    except Exception:
        # a part that died may also make the call raise (vLLM's EngineDeadError) rather than block:
        # report the death, not the traceback it caused
        with finish:
            done.set()
        reason = reason_now()
        if reason is not None:
            fault(f"{what}: {reason}")
        raise
    finally:
        with finish:
            done.set()

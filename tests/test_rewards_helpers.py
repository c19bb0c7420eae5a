"""Reward functions the reward tests load by `module:function` (also inside worker processes).

No tests here: the module must be importable by a fresh interpreter, so it imports nothing heavy.
"""
import os
import sys
import time

from rlengine.rewards import register_reward


def length_reward(text, ground_truth):
    return float(len(text))


@register_reward("shouting", parts=("loud",))
def shouting(text, ground_truth):
    loud = float(text.isupper())
    return {"reward": loud, "loud": loud}


def crash_on_marker(text, ground_truth):
    """Kills its own process (like a segfault in a C extension) when asked to."""
    if text == "CRASH":
        os._exit(3)
    return 1.0


def raise_on_marker(text, ground_truth):
    if text == "RAISE":
        raise RuntimeError("reward blew up on purpose")
    return 1.0


def sleep_on_marker(text, ground_truth):
    """A pure-Python hang (math-verify's SIGALRM would catch this one; the pool must not need it)."""
    if text.startswith("SLEEP"):
        time.sleep(float(text.split()[1]))
    return 1.0


def torch_imported(text, ground_truth):
    """1.0 when the worker process has imported torch (it must not have)."""
    return float("torch" in sys.modules)


def worker_threads(text, ground_truth):
    return float(os.environ.get("OMP_NUM_THREADS", "0"))


def worker_pid(text, ground_truth):
    return float(os.getpid())

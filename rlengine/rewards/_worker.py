"""A reward worker process (started by RewardPool as `python -m rlengine.rewards._worker R W`).

Reads newline-delimited JSON requests from fd R and writes one JSON line per scored item to fd W
(stdout stays free for anything a user reward prints). math-verify's own SIGALRM timeout is off
here: the pool kills a worker whose item overruns, which also bounds C-level calls that SIGALRM
cannot interrupt, and arming the alarm on every parse / verify costs ~5 % of the item's time.
Requests:  {"op": "score", "ref": "module:function", "items": [[id, text, ground_truth], ...]}
           {"op": "exit"}
Replies:   {"op": "ready"} once after the warm-up import,
           {"op": "result", "id": i, "score": {"reward": ..., part: ...}}
           {"op": "error", "id": i, "msg": "..."}  when the reward raised.
Keep this process light: math-verify only, never torch; the pool sets OMP_NUM_THREADS=1.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback


def _write(out, message: dict) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main(argv: list[str]) -> int:
    read_fd, write_fd = int(argv[0]), int(argv[1])
    requests = os.fdopen(read_fd, "r", encoding="utf-8")
    replies = os.fdopen(write_fd, "w", encoding="utf-8")

    from rlengine.rewards import math_answer
    from rlengine.rewards.registry import get_reward

    math_answer.VERIFY_TIMEOUT_S = None  # the pool's hard kill is the timeout (see above)
    # math-verify warns on every call made without its own timeout; here that is by design
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_answer.math_reward("<answer>\\frac{1}{2}</answer>", "0.5")  # warm-up: sympy, antlr, caches
    _write(replies, {"op": "ready", "pid": os.getpid()})

    specs = {}
    for line in requests:  # EOF (the pool went away) ends the loop
        request = json.loads(line)
        if request["op"] == "exit":
            break
        ref = request["ref"]
        try:
            spec = specs.get(ref) or specs.setdefault(ref, get_reward(ref))
        except Exception as exc:  # noqa: BLE001 - reported per item, the pool counts it
            for item_id, _, _ in request["items"]:
                _write(replies, {"op": "error", "id": item_id, "msg": f"cannot resolve reward: {exc}"})
            continue
        for item_id, text, ground_truth in request["items"]:
            try:
                score = spec(text, ground_truth)
            except Exception:  # noqa: BLE001
                _write(replies, {"op": "error", "id": item_id, "msg": traceback.format_exc(limit=3)})
            else:
                _write(replies, {"op": "result", "id": item_id, "score": score})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

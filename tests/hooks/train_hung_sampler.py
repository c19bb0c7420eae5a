"""rlengine/train.py with a fault injected from the test side: on the last rank of the world, the
HF sampler's second `generate` blocks for ever (a sampler that hangs instead of dying: a wedged
engine, a deadlocked kernel). Only the deadline around the call (rollout.generate_timeout_s) can
end it. Run by the deepspeed launcher like train.py."""
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rlengine.rollout.hf_sampler import HFSampler  # noqa: E402
from rlengine.train import main  # noqa: E402

_generate = HFSampler.generate
_calls = []


def hang_on_the_second_call(self, *args, **kwargs):
    _calls.append(1)
    if len(_calls) == 2 and int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
        threading.Event().wait()
    return _generate(self, *args, **kwargs)


HFSampler.generate = hang_on_the_second_call

if __name__ == "__main__":
    sys.exit(main())

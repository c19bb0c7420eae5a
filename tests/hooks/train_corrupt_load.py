"""rlengine/train.py with a fault injected from the test side: on the last rank of the world (an
asynchronous rollout rank), the HF sampler's second weight load gets one tensor with a flipped
value, after the push was staged and verified in transit. Only the check of what the sampler
actually loaded (at the take of the batch generated with it) can see it. Run by the launcher."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rlengine.rollout.hf_sampler import HFSampler  # noqa: E402
from rlengine.train import main  # noqa: E402

_load = HFSampler.load_weights
_calls = []


def corrupt_the_second_load(self, named_tensors):
    _calls.append(1)
    named = list(named_tensors)
    if len(_calls) == 2 and int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
        name, t = named[-1]
        t = t.clone()
        t.view(-1)[0] += 1.0
        named[-1] = (name, t)
    return _load(self, named)


HFSampler.load_weights = corrupt_the_second_load

if __name__ == "__main__":
    sys.exit(main())

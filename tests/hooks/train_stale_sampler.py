"""rlengine/train.py with a fault injected from the test side: the HF sampler loads the initial push
and then keeps those weights, while claiming every later push loaded (a sampler stuck on stale
weights). The probe after a push must notice it. Run by the deepspeed launcher like train.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rlengine.rollout.hf_sampler import HFSampler  # noqa: E402
from rlengine.train import main  # noqa: E402

_load = HFSampler.load_weights
_pushes = []


def load_first_push_only(self, named_tensors):
    _pushes.append(1)
    if len(_pushes) == 1:
        return _load(self, named_tensors)
    return [name for name, _ in named_tensors]   # claims every tensor, copies none


HFSampler.load_weights = load_first_push_only

if __name__ == "__main__":
    sys.exit(main())

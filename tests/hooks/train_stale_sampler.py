"""rlengine/train.py with a fault injected from the test side: the HF sampler loads the initial push
and then keeps those weights, while reporting every later push loaded, with the digest of the
tensors it was handed (a sampler whose compute path went stale behind a correct load, as vLLM's
packed copy of a tied lm_head once did). Only the probe after a push can notice it. Run by the
deepspeed launcher like train.py."""
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
    from rlengine.rollout.base import LoadReport
    from rlengine.weight_sync import weights_digest

    pairs = list(named_tensors)
    return LoadReport([name for name, _ in pairs], weights_digest(pairs))   # claims every tensor, copies none


HFSampler.load_weights = load_first_push_only

if __name__ == "__main__":
    sys.exit(main())

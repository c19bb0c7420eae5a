"""rlengine/train.py whose checkpoint saves pause for 30 s after every rank has written its shards and
before the commit, so that a test can kill -9 the run in the middle of a save. Run by the deepspeed
launcher like train.py (the pause lives here, not in the package)."""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rlengine.checkpoint as checkpoint  # noqa: E402
from rlengine.train import main  # noqa: E402

PAUSE_S = 30.0
_rng_state = checkpoint.rng_state


def rng_state_then_pause():
    state = _rng_state()          # CheckpointManager.save calls it after the shards, before the commit
    time.sleep(PAUSE_S)
    return state


checkpoint.rng_state = rng_state_then_pause

if __name__ == "__main__":
    sys.exit(main())

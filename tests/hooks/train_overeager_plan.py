"""rlengine/train.py with the prompt plan broken from the test side: it requests one step further
ahead than rollout.max_staleness allows, with a min_version that allows it too. Only the trainer's
own check of every sample's version (async_rollout.StaleBatch) stands between that batch and the
update. Run by the deepspeed launcher like train.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from rlengine.prompt_plan import PromptPlan  # noqa: E402
from rlengine.train import main  # noqa: E402

_init = PromptPlan.__init__


def one_step_too_far(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.ahead += 1


PromptPlan.__init__ = one_step_too_far

if __name__ == "__main__":
    sys.exit(main())

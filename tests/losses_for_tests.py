"""Losses registered by the tests, named in a config as `tests.losses_for_tests:<function>` (the
engine imports them like any plug-in: test hooks live here, not in the package)."""
import torch

from rlengine.losses import register_loss


@register_loss("test_nonfinite", elementwise=False)
def nonfinite(ctx, *, eps_low=0.2, eps_high=0.2):
    """l = -A * r * nan: every update's loss and gradient are NaN (drives the non-finite guard)."""
    return ctx.ratio * torch.tensor(float("nan"), dtype=ctx.ratio.dtype)

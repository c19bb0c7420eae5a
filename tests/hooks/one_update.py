"""One optimizer step of the real engine on a fixed batch, with the gradient captured: run by the
deepspeed launcher (2 ranks) for tests/test_engine_update.py.

The batch (`<run.output_dir>/batch.pt`, written by the test) holds every rank's sequences; this rank
takes its contiguous share, as the training loop does. `Actor.update` runs the micro-batch loop with
gradient accumulation; at the accumulation boundary, before DeepSpeed's optimizer step, the full
(un-partitioned, un-clipped) gradient of every parameter is gathered and rank 0 writes it to
`<run.output_dir>/grads.pt`. Nothing here computes the objective: that is the engine's job."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main() -> int:
    from deepspeed.utils import safe_get_full_grad

    from rlengine.actor import Actor, ReferenceModel, SeqBatch
    from rlengine.batch import RolloutBatch
    from rlengine.config import parse_cli
    from rlengine.distributed import finish_distributed, init_distributed
    from rlengine.losses import LOSSES
    from rlengine.step_metrics import StepMetrics

    cfg, _ = parse_cli(sys.argv[1:], "one update")
    ctx = init_distributed(cfg)
    out = Path(cfg.run.output_dir)
    data = torch.load(out / "batch.pt", weights_only=True)
    share = len(data["input_ids"]) // ctx.num_trainers
    mine = torch.arange(ctx.trainer_index * share, (ctx.trainer_index + 1) * share)
    seqs = SeqBatch(*(data[k][mine] for k in ("input_ids", "attention_mask", "resp_pos", "resp_mask", "targets")))
    batch = RolloutBatch(seqs, data["old_logp"][mine].clone(), cfg.rollout.group_size,
                         old_logp=data["old_logp"][mine], advantages=data["advantages"][mine],
                         loss_mask=seqs.resp_mask.clone())
    grad_accum = -(-share // cfg.train.micro_batch_size)
    actor = Actor(cfg, cfg.model.path, grad_accum, total_updates=1, dp_group=ctx.trainer_group)
    if cfg.train.kl_coef > 0:
        ref = ReferenceModel(cfg, cfg.model.ref_path, dp_group=ctx.trainer_group)
        batch.ref_logp = ref.batch_logprobs(seqs, cfg.rollout.temperature, cfg.train.micro_batch_size)

    captured = {}
    step = Actor.step

    def step_and_capture(self):
        if self.engine.is_gradient_accumulation_boundary():   # every rank: the gathers are collective
            captured.update({n: safe_get_full_grad(p).detach().clone() for n, p in self.engine.module.named_parameters()})
            captured["__micro_batches__"] = torch.tensor(float(self.engine.micro_steps + 1))
        return step(self)

    Actor.step = step_and_capture
    metrics = StepMetrics()
    actor.update(batch, torch.arange(share), LOSSES.build(cfg.loss.name, **cfg.loss.params), cfg, metrics)
    record = metrics.reduce(ctx.trainer_group)
    if ctx.is_main:
        captured["__loss__"] = torch.tensor(record["loss_sum"])
        torch.save(captured, out / "grads.pt")
    finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

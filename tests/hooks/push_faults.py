"""Weight pushes of the real engine (DeepSpeed ZeRO-3 actor, colocated HF sampler, 1 rank) with a
fault injected between the trainer and the sampler; run by the deepspeed launcher for
tests/test_push_faults.py. Each case's outcome goes to `<run.output_dir>/faults.json`."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

CORRUPT = "model.layers.3.mlp.down_proj.weight"
DROPPED = "model.norm.weight"


def main() -> int:
    from rlengine.actor import Actor
    from rlengine.config import parse_cli
    from rlengine.distributed import finish_distributed, init_distributed
    from rlengine.model import load_tokenizer, resolve_model_path
    from rlengine.placement import Colocated, PushFailure, build_local_sampler
    from rlengine.rollout.base import LoadReport
    from rlengine.weight_sync import weights_digest

    cfg, _ = parse_cli(sys.argv[1:], "push faults")
    ctx = init_distributed(cfg)
    path = resolve_model_path(cfg.model.path)
    actor = Actor(cfg, path, grad_accum=1, total_updates=1, dp_group=ctx.trainer_group)
    sampler = build_local_sampler(cfg, path, load_tokenizer(path))
    placement = Colocated(cfg, ctx, sampler)
    placement.close = lambda: None           # a failed push closes the sampler; here the next case reuses it
    honest_load = sampler.load_weights
    probe = (list(range(1000, 1020)), list(range(2000, 2012)))
    results = {}
    faults = {"left": 0}

    def transit(fault):
        """Install `fault` (pairs -> pairs, or a LoadReport for a lying sampler) for the next `times` loads."""
        def load(named):
            pairs = [(n, t.clone()) for n, t in named]
            if faults["left"] > 0:
                faults["left"] -= 1
                pairs = fault(pairs)
                if isinstance(pairs, LoadReport):
                    return pairs
            return honest_load(pairs)
        sampler.load_weights = load

    def corrupt(pairs):
        for name, t in pairs:
            if name == CORRUPT:
                t.view(-1)[12345] += 1e-3          # one value, a little: only the digest can tell
        return pairs

    def drop(pairs):
        return [(n, t) for n, t in pairs if n != DROPPED]

    def stale(pairs):
        return LoadReport([n for n, _ in pairs], weights_digest(pairs))   # says it loaded them; keeps the old

    def nudge():
        """Move the actor's weights, so that a sampler keeping its old ones is stale."""
        import deepspeed

        params = list(actor.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
            for p in params:
                p.mul_(0.98)

    def attempt(case, fault, times):
        transit(fault)
        faults["left"] = times
        nudge()
        try:
            results[case] = {"ok": True, "metrics": placement.push(actor, probe=probe)}
        except PushFailure as e:
            results[case] = {"ok": False, "error": str(e)}
        faults["left"] = 0

    results["clean"] = {"ok": True, "metrics": placement.push(actor, probe=probe)}
    for case, fault, times in (("corrupt", corrupt, 2), ("drop", drop, 2), ("stale", stale, 2),
                               ("transient", corrupt, 1)):
        attempt(case, fault, times)
    if ctx.is_main:
        (Path(cfg.run.output_dir) / "faults.json").write_text(json.dumps(results))
    finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

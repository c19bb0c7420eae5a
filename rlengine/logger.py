"""Run logging: metrics.jsonl (one line per training step), TensorBoard, W&B, per-token dumps.

Only rank 0 writes. On resume, `truncate_after(step)` drops lines written after the checkpoint
that is being resumed, so the metrics file continues without duplicates or gaps.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

REGION_NAMES = ("M", "LN", "HP", "LP", "HN")


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e300 if value > 0 else -1e300)
    return value


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, wandb_run_name: str | None = None, config: dict | None = None):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("run.wandb_project is set but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, name=wandb_run_name or self.dir.name, config=config)

    def truncate_after(self, step: int) -> None:
        """Keep only the lines with `step <= step` (called when resuming from that step)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill: drop it and everything after
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # TensorBoard and W&B take the numbers; lists (data/prompt_ids) stay in metrics.jsonl
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class TokenRecorder:
    """Collects one step's per-token records as the updates run (what the ratio / probability
    plots read); `write` samples and stores them."""

    COLUMNS = ("update", "seq", "pos", "prob", "old_prob", "ratio", "advantage", "weight", "rel_weight", "region",
               "entropy")

    def __init__(self):
        self.rows: dict[str, list[torch.Tensor]] = {k: [] for k in self.COLUMNS}
        self.update = 0

    def next_update(self) -> None:
        self.update += 1

    def add(self, seq_index: torch.Tensor, mb, logp, old_logp, out, entropy) -> None:
        """One micro-batch: `seq_index` [b] its sequences in the step's batch, `mb` its RolloutBatch,
        the rest [b, T] as the loss saw them (`out`: the loss's PolicyLossOutput)."""
        sel = mb.loss_mask.bool()                                                        # [b, T]
        advantages = mb.advantages if mb.advantages.dim() == 2 else mb.advantages.unsqueeze(1).expand_as(sel)
        columns = {
            "update": torch.full((int(sel.sum()),), self.update),
            "seq": seq_index.unsqueeze(1).expand_as(sel)[sel],
            "pos": torch.arange(sel.shape[1]).expand_as(sel)[sel],
            "prob": logp[sel].exp(), "old_prob": old_logp[sel].exp(), "ratio": out.ratio[sel],
            "advantage": advantages[sel], "weight": out.weight[sel], "rel_weight": out.rel_weight[sel],
            "region": out.region[sel], "entropy": entropy[sel],
        }
        for key, value in columns.items():
            self.rows[key].append(value)

    def write(self, path: str | Path, step: int, loss_name: str, eps_low: float, eps_high: float,
              max_rows: int) -> int:
        if not self.rows["seq"]:
            return 0
        rows = {k: torch.cat(v) for k, v in self.rows.items()}
        rows["step"] = torch.full_like(rows["seq"], step)
        return write_token_dump(path, rows, loss_name, eps_low, eps_high, max_rows, seed=step)


def write_token_dump(path: str | Path, rows: dict[str, torch.Tensor | list], loss_name: str,
                     eps_low: float, eps_high: float, max_rows: int, seed: int) -> int:
    """Write a random sample of per-token records to Parquet (columns: notes in the README).

    `rows` holds equal-length 1-D tensors: step, update, seq, pos, prob, old_prob, ratio,
    advantage, weight, rel_weight, region (int codes into REGION_NAMES), entropy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(rows["ratio"])
    if n == 0:
        return 0
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(n, generator=g)[:max_rows].sort().values
    cols = {}
    for k, v in rows.items():
        t = torch.as_tensor(v)[keep]
        if k == "region":
            cols[k] = [REGION_NAMES[i] for i in t.tolist()]
        else:
            cols[k] = t.float().numpy() if t.is_floating_point() else t.long().numpy()
    m = len(keep)
    cols["loss"] = [loss_name] * m
    cols["eps_low"] = [float(eps_low)] * m
    cols["eps_high"] = [float(eps_high)] * m
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, path)
    return m

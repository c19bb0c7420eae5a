"""Shared helpers of the plotting tools: reading a run directory, loss specs, smoothing, saving.

Owns the reading side of the run-directory contract (`notes/RUNDIR.md`):
  * `read_metrics(run)`  metrics.jsonl (or, when that is missing, the TensorBoard files in tb/)
  * `read_tokens(run)`   the per-token Parquet dumps in tokens/, filtered by step range
  * `run_loss_spec(run)` the run's own loss and hyperparameters (config.yaml, else the dump)
and the pieces every figure shares: `LossSpec` parsing ("dgpo:n=2,m=2", "sapo_erf"),
`recompute_weights` (the loss zoo applied to dumped ratios and advantages), EMA smoothing,
region colours, and `save_figure` (PNG by default, PDF / SVG on request).

The tools live in `tools/` as scripts; they import this module as `_plotting` (the script's
folder is on sys.path).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REGIONS = ("M", "LN", "HP", "LP", "HN")
REGION_COLORS = {"M": "#4c72b0", "LN": "#c44e52", "HP": "#55a868", "LP": "#dd8452", "HN": "#8172b3"}
REGION_TITLES = {
    "M": "M (in boundary)",
    "LN": "LN (left boundary, A<=0)",
    "HP": "HP (right boundary, A>0)",
    "LP": "LP (reverse left, A>0)",
    "HN": "HN (reverse right, A<=0)",
}
TOKEN_COLUMNS = ("step", "update", "seq", "pos", "prob", "old_prob", "ratio", "advantage", "weight",
                 "rel_weight", "region", "entropy", "loss", "eps_low", "eps_high")
FORMATS = ("png", "pdf", "svg")


# ----------------------------------------------------------------------------- step ranges

def parse_steps(text: str | None) -> tuple[int | None, int | None]:
    """'10:50' -> (10, 50); '10:' -> (10, None); ':50' -> (None, 50); '20' -> (20, 20); None -> all."""
    if text is None or str(text).strip() in ("", ":"):
        return None, None
    text = str(text).strip()
    try:
        if ":" not in text:
            step = int(text)
            return step, step
        lo, hi = text.split(":", 1)
        return (int(lo) if lo.strip() else None), (int(hi) if hi.strip() else None)
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected A:B, A:, :B or A (integers)") from None


def in_range(steps: pd.Series, lo: int | None, hi: int | None) -> pd.Series:
    keep = pd.Series(True, index=steps.index)
    if lo is not None:
        keep &= steps >= lo
    if hi is not None:
        keep &= steps <= hi
    return keep


# ----------------------------------------------------------------------------- metrics

def _read_jsonl(path: Path) -> list[dict]:
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # a torn last line (the run was killed mid-write): ignore it
                break
            raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}, line {i}: expected a JSON object with a 'step' key")
        records.append(rec)
    return records


def _read_tensorboard(tb_dir: Path) -> pd.DataFrame:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows: dict[int, dict[str, float]] = {}
    event_dirs = sorted({p.parent for p in tb_dir.rglob("events.out.tfevents.*")})
    for d in event_dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                rows.setdefault(int(ev.step), {})[tag] = float(ev.value)
    if not rows:
        raise FileNotFoundError(f"{tb_dir}: no TensorBoard scalars found")
    return pd.DataFrame([{"step": s, **v} for s, v in sorted(rows.items())])


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """One row per logged step, sorted by step, columns = the metric keys (NaN where absent).

    Reads `<run>/metrics.jsonl`; if it is missing, the TensorBoard event files under `<run>/tb/`
    (or under `<run>` itself). A resumed run that logged a step twice keeps the last record."""
    run = Path(run_dir)
    path = run / "metrics.jsonl"
    if path.is_file():
        records = _read_jsonl(path)
        if not records:
            raise ValueError(f"{path}: no metrics logged yet")
        df = pd.DataFrame(records)
    else:
        tb = run / "tb" if (run / "tb").is_dir() else run
        if not run.is_dir():
            raise FileNotFoundError(f"run directory {run} does not exist")
        if not any(tb.rglob("events.out.tfevents.*")):
            raise FileNotFoundError(f"{run}: neither metrics.jsonl nor TensorBoard files (tb/) found")
        df = _read_tensorboard(tb)
    df = df.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    for col in df.columns:
        if col != "step":
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


# ----------------------------------------------------------------------------- per-token dumps

_STEP_FILE = re.compile(r"step_(\d+)\.parquet$")


def token_files(run_dir: str | Path, lo: int | None = None, hi: int | None = None) -> list[Path]:
    """The run's tokens/step_XXXXXX.parquet files whose step lies in [lo, hi], in step order."""
    tokens = Path(run_dir) / "tokens"
    out = []
    for p in sorted(tokens.glob("step_*.parquet")):
        m = _STEP_FILE.search(p.name)
        if not m:
            continue
        step = int(m.group(1))
        if (lo is None or step >= lo) and (hi is None or step <= hi):
            out.append(p)
    return out


def read_tokens(run_dir: str | Path, lo: int | None = None, hi: int | None = None,
                last_update_only: bool = False) -> pd.DataFrame:
    """All dumped per-token rows of the run with lo <= step <= hi (None = open end).

    `last_update_only` keeps, per step, only the rows of the last optimizer update (DGPO Fig. 4a
    shows the final mini-batch, where the policy has moved furthest from pi_old)."""
    run = Path(run_dir)
    files = token_files(run, lo, hi)
    if not files:
        where = f" with step in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise FileNotFoundError(f"{run}: no per-token dumps tokens/step_*.parquet{where} "
                                "(is run.token_dump_every > 0?)")
    frames = []
    for p in files:
        df = pd.read_parquet(p)
        missing = [c for c in ("step", "prob", "ratio", "advantage", "region", "eps_low", "eps_high") if c not in df.columns]
        if missing:
            raise ValueError(f"{p}: missing column(s) {', '.join(missing)} (see RUNDIR.md)")
        bad = sorted(set(df["region"].astype(str)) - set(REGIONS))
        if bad:
            raise ValueError(f"{p}: unknown region label(s) {bad}; expected {list(REGIONS)}")
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    if lo is not None or hi is not None:
        df = df[in_range(df["step"], lo, hi)]
    if last_update_only and "update" in df.columns and len(df):
        last = df.groupby("step")["update"].transform("max")
        df = df[df["update"] == last]
    if not len(df):
        raise ValueError(f"{run}: the per-token dumps hold no rows in the chosen step range")
    return df.reset_index(drop=True)


def run_label(run_dir: str | Path) -> str:
    p = Path(run_dir).resolve()
    return p.name or str(p)


# ----------------------------------------------------------------------------- loss specs

@dataclass
class LossSpec:
    """A loss of the zoo with hyperparameters, e.g. parsed from 'dgpo:n=2,m=2' or 'sapo_erf'."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        if not self.label:
            self.label = self.name + (" " + ",".join(f"{k}={v}" for k, v in self.params.items()) if self.params else "")


def _scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def parse_loss_spec(text: str) -> LossSpec:
    """'grpo', 'dgpo:n=2,m=2', 'sapo:gate=erf,tau_pos=10', or 'sapo_<gate>' (= sapo with that gate).

    Validated against the loss registry (unknown losses / parameters are errors naming them)."""
    from rlengine import losses

    text = text.strip()
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    if name not in losses.LOSSES and name.startswith("sapo_") and name[5:] in losses.GATES:
        params["gate"] = name[5:]
        name = "sapo"
    for item in filter(None, (s.strip() for s in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"loss spec {text!r}: {item!r} is not key=value")
        k, v = item.split("=", 1)
        params[k.strip()] = _scalar(v.strip())
    if name not in losses.LOSSES:
        raise ValueError(f"loss spec {text!r}: unknown loss {name!r}; valid: {', '.join(sorted(losses.LOSSES))} "
                         f"or sapo_<gate> with gate in {', '.join(sorted(losses.GATES))}")
    losses.validate_loss_params(name, params)
    return LossSpec(name, params, label=text)


def run_loss_spec(run_dir: str | Path, tokens: pd.DataFrame | None = None) -> LossSpec:
    """The loss a run trained with: its config.yaml loss section, else the dump's loss column."""
    import yaml

    from rlengine import losses

    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        raw = yaml.safe_load(cfg_path.read_text()) or {}
        section = dict(raw.get("loss") or {})
        name = section.pop("name", None)
        if name in losses.LOSSES:
            valid = losses.loss_hyperparams(name)
            params = {k: v for k, v in section.items() if k in valid}
            label = name + (f" ({params['gate']})" if name == "sapo" and "gate" in params else "")
            return LossSpec(name, params, label=label)
    if tokens is not None and "loss" in tokens.columns and len(tokens):
        name = str(tokens["loss"].iloc[0])
        if name in losses.LOSSES:
            return LossSpec(name, {"eps_low": float(tokens["eps_low"].iloc[0]),
                                   "eps_high": float(tokens["eps_high"].iloc[0])})
    raise ValueError(f"{run}: cannot tell which loss the run used (no config.yaml loss section, "
                     "no 'loss' column in the dumps); pass --loss")


def recompute_weights(spec: LossSpec, ratio: np.ndarray, advantage: np.ndarray,
                      eps_low: float, eps_high: float) -> tuple[np.ndarray, np.ndarray]:
    """(relative weight w / r [N], region labels [N]) of loss `spec` on the given tokens.

    Runs the real loss zoo (`rlengine.losses.policy_loss`) on logp = log r, old_logp = 0, one
    token per row. The spec's own eps_low / eps_high win over the dump's."""
    import torch

    from rlengine import losses

    params = {"eps_low": eps_low, "eps_high": eps_high, **spec.params}
    r = torch.tensor(np.asarray(ratio, dtype=np.float64)).clamp_min(1e-300)
    logp = torch.log(r).unsqueeze(1)                                       # [N, 1]
    adv = torch.tensor(np.asarray(advantage, dtype=np.float64))            # [N]
    mask = torch.ones_like(logp, dtype=torch.bool)
    out = losses.policy_loss(spec.name, logp, torch.zeros_like(logp), adv, mask, **params)
    rel = out.rel_weight.squeeze(1).numpy()
    region = np.asarray(losses.REGIONS, dtype=object)[out.region.squeeze(1).numpy()]
    return rel, region


# ----------------------------------------------------------------------------- smoothing and output

def ema(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average; NaNs are skipped (kept as NaN).

    weight 0 = no smoothing, 0.99 = very smooth."""
    if not 0 <= weight < 1:
        raise ValueError(f"--smooth {weight}: must be in [0, 1)")
    v = np.asarray(values, dtype=np.float64)
    out = np.full_like(v, np.nan)
    acc, norm = 0.0, 0.0
    for i, x in enumerate(v):
        if math.isnan(x):
            continue
        acc = weight * acc + (1 - weight) * x
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


RATIO_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 1.0, 1.2, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


def plain_log_ticks(axis, lo: float, hi: float, candidates: Sequence[float] = RATIO_TICKS) -> None:
    """Readable ticks on a log-scaled ratio axis: plain numbers (0.5, 0.8, 1, 1.2, 2 ...), no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = [t for t in candidates if lo <= t <= hi]
    if len(ticks) >= 2:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def check_formats(formats: Iterable[str]) -> list[str]:
    out = []
    for f in formats:
        for part in str(f).split(","):
            part = part.strip().lower().lstrip(".")
            if part not in FORMATS:
                raise ValueError(f"--format {part!r}: valid formats are {', '.join(FORMATS)}")
            if part not in out:
                out.append(part)
    return out or ["png"]


def save_figure(fig, stem: str | Path, formats: Iterable[str] = ("png",), dpi: int = 130) -> list[Path]:
    """Write `fig` as `<stem>.<fmt>` for each format; returns the paths written."""
    stem = Path(stem)
    if stem.suffix.lower().lstrip(".") in FORMATS:
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in check_formats(formats):
        path = stem.parent / f"{stem.name}.{fmt}"
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def label_runs(runs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    if labels:
        if len(labels) != len(runs):
            raise ValueError(f"--labels: {len(labels)} label(s) for {len(runs)} run(s)")
        return list(labels)
    names = [run_label(r) for r in runs]
    if len(set(names)) < len(names):  # same folder names in different parents: use more of the path
        names = [str(Path(r)) for r in runs]
    return names

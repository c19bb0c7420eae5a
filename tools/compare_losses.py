#!/usr/bin/env python
"""Run the same short experiment with several losses, then compare them: figures and a table.

    python tools/compare_losses.py --losses grpo,dgpo,sapo_erf [--config configs/default.yaml] \
        [--steps 30] [--out runs/compare] [--set key=value ...] [--last-k 5] \
        [--launcher "deepspeed --num_gpus 8"] [--train-cmd TEMPLATE] [--skip-existing] [--plots-only]

For each loss spec it writes `<out>/<label>.yaml` (the base config with its `loss` section
replaced, run.output_dir = `<out>/<label>`, run.total_steps = --steps) and runs the train command
(template below) with its output in `<out>/<label>.log`. A loss spec is either the name of a
per-loss config (`configs/<spec>.yaml`: its loss section is used as is, e.g. `sapo_erf`) or
`name[:key=value,...]` (e.g. `dgpo:n=1,m=4`, `sapo:gate=erf,tau_pos=5,agg=seq-mean-token-mean`).

Then, from the run directories:
  <out>/compare_curves.<fmt>   reward, answer / format reward, entropy, EUR, clip and boundary
                               fractions, response length, KL to pi_old: one line per loss
  <out>/compare_ratios.<fmt>   the importance-ratio distributions overlaid (second half of training)
  <out>/compare_weights.<fmt>  each loss's relative gradient weight on the same (first run's) tokens
  <out>/summary.md / .json     final reward (mean of the last K logged steps), answer / format
                               reward, entropy, EUR, clip fraction, LN / HP fractions, s/step
The table is printed too. Exit status 1 when a run failed (the others are still compared).

Train command template (--train-cmd), formatted then split like a shell line:
  default  "{launcher} {repo}/rlengine/train.py --config {config} {overrides}"
  fields   {python} {repo} {config} {out_dir} {label} {overrides} {launcher}
{launcher} is --launcher, or the Python interpreter when --launcher is not given: a launcher such as
deepspeed runs the script with its own Python, so the interpreter must not follow it.
e.g. --train-cmd "{python} -m rlengine train --nproc 2 --config {config} {overrides}".
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(REPO))

import _plotting as P  # noqa: E402

DEFAULT_TEMPLATE = "{launcher} {repo}/rlengine/train.py --config {config} {overrides}"
CURVE_METRICS = ["reward/mean", "reward/answer", "reward/format", "entropy", "eur", "clip_frac", "frac_LN",
                 "frac_HP", "response_len/mean", "kl_old"]
TABLE = [("reward", "reward/mean"), ("answer", "reward/answer"), ("format", "reward/format"), ("entropy", "entropy"),
         ("EUR", "eur"), ("clip", "clip_frac"), ("LN", "frac_LN"), ("HP", "frac_HP"), ("s/step", "time/step")]


def loss_section(spec: str, base_agg: str | None, configs_dir: Path = REPO / "configs") -> tuple[str, dict]:
    """(label, loss section) for a loss spec (see the module docstring)."""
    from rlengine import losses

    spec = spec.strip()
    file = configs_dir / f"{spec}.yaml"
    if ":" not in spec and file.is_file() and spec != "default":
        raw = yaml.safe_load(file.read_text()) or {}
        if "loss" not in raw:
            raise ValueError(f"{file}: no loss section")
        return spec, dict(raw["loss"])
    name, _, rest = spec.partition(":")
    extra = {}
    kept = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, _, value = item.partition("=")
        if key.strip() in ("agg", "max_len"):
            extra[key.strip()] = yaml.safe_load(value)
        else:
            kept.append(item)
    parsed = P.parse_loss_spec(name + (":" + ",".join(kept) if kept else ""))
    section = {"name": parsed.name, **parsed.params}
    own = losses.LOSSES[parsed.name].agg   # a loss with its paper's own aggregation (GSPO, GMPO) keeps it
    agg = extra.get("agg") or ("seq-mean-token-mean" if parsed.name == "sapo" else
                               own if own != "token-mean" else base_agg)
    if agg:
        if agg not in losses.AGG_MODES:
            raise ValueError(f"loss spec {spec!r}: agg {agg!r} is not one of {list(losses.AGG_MODES)}")
        section["agg"] = agg
    if "max_len" in extra:
        section["max_len"] = extra["max_len"]
    label = spec.replace(":", "_").replace(",", "_").replace("=", "")
    return label, section


def write_run_configs(base_config: Path, specs: list[str], out: Path, steps: int | None,
                      sets: list[str]) -> list[dict]:
    """Per-loss YAML files, each validated with rlengine.config before anything runs."""
    from rlengine.config import load_config

    raw = yaml.safe_load(base_config.read_text()) or {}
    runs = []
    for spec in specs:
        label, section = loss_section(spec, (raw.get("loss") or {}).get("agg"))
        if any(r["label"] == label for r in runs):
            raise ValueError(f"--losses: {spec!r} given twice")
        cfg = json.loads(json.dumps(raw))  # deep copy
        cfg["loss"] = section
        cfg.setdefault("run", {})["output_dir"] = str(out / label)
        if steps is not None:
            cfg["run"]["total_steps"] = steps
        path = out / f"{label}.yaml"
        path.write_text(f"# compare_losses.py: {base_config} with loss {spec!r}\n" + yaml.safe_dump(cfg, sort_keys=False))
        load_config(path, sets)  # fail now, not after the first run
        runs.append({"label": label, "spec": spec, "config": path, "out_dir": out / label})
    return runs


def train_command(template: str, run: dict, sets: list[str], launcher: str) -> list[str]:
    fields = {"python": shlex.quote(sys.executable), "repo": shlex.quote(str(REPO)),
              "config": shlex.quote(str(run["config"])), "out_dir": shlex.quote(str(run["out_dir"])),
              "label": shlex.quote(run["label"]), "overrides": " ".join(shlex.quote(s) for s in sets),
              "launcher": launcher or shlex.quote(sys.executable)}
    try:
        return shlex.split(template.format(**fields))
    except KeyError as e:
        raise ValueError(f"--train-cmd: unknown field {e}; fields: {', '.join(sorted(fields))}") from None


def finished(run_dir: Path, steps: int | None) -> bool:
    try:
        df = P.read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return False
    return steps is None or int(df["step"].max()) >= steps


def run_all(runs: list[dict], template: str, sets: list[str], launcher: str, steps: int | None,
            skip_existing: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for i, run in enumerate(runs, 1):
        if skip_existing and finished(run["out_dir"], steps):
            print(f"[{i}/{len(runs)}] {run['label']}: already finished, skipped", flush=True)
            run["status"] = "skipped"
            continue
        cmd = train_command(template, run, sets, launcher)
        log = run["config"].with_suffix(".log")
        print(f"[{i}/{len(runs)}] {run['label']}: {' '.join(cmd)}  (log: {log})", flush=True)
        start = time.time()
        with open(log, "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
        run["seconds"] = time.time() - start
        run["status"] = "ok" if rc == 0 else f"failed (exit {rc})"
        print(f"      {run['status']} in {run['seconds']:.0f} s", flush=True)
        if rc != 0:
            tail = log.read_text().splitlines()[-8:]
            print("      " + "\n      ".join(tail), flush=True)


def summary_rows(runs: list[dict], last_k: int) -> list[dict]:
    rows = []
    for run in runs:
        row = {"label": run["label"], "status": run.get("status", "not run")}
        try:
            df = P.read_metrics(run["out_dir"])
        except (FileNotFoundError, ValueError) as e:
            row["error"] = str(e)
            rows.append(row)
            continue
        tail = df.tail(last_k)
        row["steps"] = int(df["step"].max())
        for name, key in TABLE:
            row[name] = float(tail[key].mean()) if key in tail and tail[key].notna().any() else None
        rows.append(row)
    return rows


def format_summary(rows: list[dict], last_k: int) -> str:
    cols = ["label", "steps"] + [name for name, _ in TABLE]
    lines = [f"Mean over the last {last_k} logged steps of each run.", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | {row['status']}: {row['error']} |" + " |" * (len(cols) - 2))
            continue
        cells = [row["label"], str(row["steps"])]
        for name, _ in TABLE:
            v = row.get(name)
            cells.append("-" if v is None else (f"{v:.1f}" if name == "s/step" else f"{v:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_figures(runs: list[dict], out: Path, formats: list[str], smooth: float) -> list[Path]:
    import plot_curves
    import plot_scatter

    ok = [r for r in runs if finished(r["out_dir"], None)]
    if not ok:
        return []
    labels = [r["label"] for r in ok]
    written = plot_curves.plot_curves([P.read_metrics(r["out_dir"]) for r in ok], labels, CURVE_METRICS,
                                      out / "compare_curves", formats, smooth=smooth,
                                      title="loss comparison: training curves")
    token_sets, token_labels = [], []
    for r, label in zip(ok, labels):
        files = P.token_files(r["out_dir"])
        if not files:
            continue
        steps = sorted(int(f.stem.split("_")[1]) for f in files)
        lo = steps[len(steps) // 2]  # the second half of training
        token_sets.append(P.read_tokens(r["out_dir"], lo, None))
        token_labels.append(label)
    if token_sets:
        written += plot_scatter.plot_ratios(token_sets, token_labels, out / "compare_ratios", formats)
        specs = []
        for r in ok:
            spec = P.run_loss_spec(r["out_dir"])
            spec.label = r["label"]
            specs.append(spec)
        written += plot_scatter.plot_weights(token_sets[0], specs, f"tokens of {token_labels[0]}",
                                             out / "compare_weights", formats)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Same experiment, several losses: runs, figures, table.")
    ap.add_argument("--losses", required=True, help="comma list of loss specs (per-loss config names or name:k=v,...)")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"), help="base config (default: the embedded default)")
    ap.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    ap.add_argument("--steps", type=int, default=None, help="run.total_steps of every run (default: the config's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run, repeatable")
    ap.add_argument("--last-k", type=int, default=5, help="steps averaged for the table (default 5)")
    ap.add_argument("--launcher", default="", help="what runs rlengine/train.py, e.g. 'deepspeed --num_gpus 8' (default: this Python)")
    ap.add_argument("--train-cmd", default=DEFAULT_TEMPLATE, help="train command template (see the module doc)")
    ap.add_argument("--skip-existing", action="store_true", help="skip runs whose metrics already reach --steps")
    ap.add_argument("--plots-only", action="store_true", help="no training: compare the existing run directories")
    ap.add_argument("--smooth", type=float, default=0.6, help="EMA smoothing of the curves")
    ap.add_argument("--format", nargs="+", default=["png"], help="png (default), pdf, svg")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        formats = P.check_formats(args.format)
        specs = [s for s in args.losses.split(",") if s.strip()]
        # a spec may itself contain commas (dgpo:n=1,m=4): glue "k=v" pieces back to their loss
        merged: list[str] = []
        for s in specs:
            if merged and "=" in s and ":" not in s and ":" in merged[-1]:
                merged[-1] += "," + s
            else:
                merged.append(s)
        runs = write_run_configs(Path(args.config), merged, out, args.steps, args.set)
        if not args.plots_only:
            run_all(runs, args.train_cmd, args.set, args.launcher, args.steps, args.skip_existing)
        rows = summary_rows(runs, args.last_k)
        table = format_summary(rows, args.last_k)
        (out / "summary.md").write_text(table + "\n")
        (out / "summary.json").write_text(json.dumps(rows, indent=1))
        written = make_figures(runs, out, formats, args.smooth)
    except (ValueError, FileNotFoundError) as e:
        print(f"compare_losses: error: {e}", file=sys.stderr)
        return 2
    print(table)
    for p in written:
        print(p)
    failed = [r["label"] for r in runs if str(r.get("status", "")).startswith("failed")]
    if failed:
        print(f"failed runs: {', '.join(failed)} (see their .log files)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `rlengine` command (also `python -m rlengine`).

    rlengine train --config configs/default.yaml [key=value ...] [--nproc 2] [--hostfile H]
        wraps the launch a user would otherwise type:
        deepspeed --hostfile launch/hosts --no_ssh --node_rank 0 --master_addr 127.0.0.1 \\
                  rlengine/train.py --config ... (one box); with --hostfile of several nodes
        the plain multi-node form (ssh / pdsh) is used, after checking pdsh and ssh to every
        host and picking the interface gloo / NCCL use on every node (rlengine/hosts.py).
    rlengine list      the registered losses, gates, rewards, dataset presets
    rlengine config    print the resolved config (same arguments as train)
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
SSH_KEEPALIVE = "-o ServerAliveInterval=5 -o ServerAliveCountMax=3"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(config: str | list[str] | None, overrides: list[str], nproc: int, hostfile: str | None,
                   master_port: int | None = None, check: bool = True, socket_ifname: str | None = None) -> list[str]:
    """The deepspeed launcher line for one box (no ssh) or for the nodes of a hostfile; for several
    nodes, after checking them (`rlengine.hosts`; `check=False` skips it, for --dry-run), with the
    first node's address as the rendezvous and, unless the config names one (`socket_ifname`),
    the interface every node uses toward it."""
    from rlengine.hosts import check_hosts, master_address, pick_socket_interface, read_hostfile

    ds = shutil.which("deepspeed")
    launcher = [ds] if ds else [sys.executable, "-m", "deepspeed.launcher.runner"]
    port = str(master_port or _free_port())
    if hostfile is None:
        tmp = Path(tempfile.mkdtemp(prefix="rlengine-hosts-")) / "hosts"
        tmp.write_text(f"localhost slots={nproc}\n")
        hostfile = str(tmp)
    elif not Path(hostfile).is_file():
        raise FileNotFoundError(f"hostfile not found: {hostfile}")
    hosts = read_hostfile(hostfile)
    one_box = all(h in ("localhost", "127.0.0.1", socket.gethostname()) for h in hosts)
    cmd = launcher + ["--hostfile", hostfile, "--master_port", port]
    if one_box:
        cmd += ["--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1"]
    elif check:
        check_hosts(hosts)
        # the address the interfaces are chosen toward is the one the ranks meet at (DeepSpeed would
        # otherwise take the first of `ssh <host> hostname -I`)
        master = master_address(hosts)
        cmd += ["--master_addr", master]
        if socket_ifname is None:
            overrides = list(overrides) + [f"run.socket_ifname={pick_socket_interface(hosts, master)}"]
    cmd += [str(TRAIN_SCRIPT)]
    for path in [config] if isinstance(config, str) else (config or []):
        cmd += ["--config", path]
    return cmd + list(overrides)


def cmd_list() -> int:
    from rlengine import losses, rewards
    from rlengine import data

    print("losses :", ", ".join(sorted(losses.LOSSES)))
    for name in sorted(losses.LOSSES):
        entry = losses.LOSSES[name]
        params = ", ".join(f"{k}={v!r}" for k, v in entry.defaults.items())
        kind = "token" if entry.elementwise else "sequence"
        print(f"  {name:11s} [{kind}, agg {entry.agg}] {params}")
    print("gates  :", ", ".join(sorted(losses.GATES)))
    print("agg    :", ", ".join(losses.AGG_MODES))
    print("rewards:", ", ".join(sorted(rewards.REWARDS)))
    print("data   :", ", ".join(sorted(data.PRESETS)))
    print("system prompts:", ", ".join(sorted(data.SYSTEM_PROMPTS)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="rlengine", description="rlengine: RL for LLM reasoning")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="launch training through the deepspeed launcher")
    tr.add_argument("--config", action="append", help="YAML config; repeat to merge overlays in order")
    tr.add_argument("--nproc", type=int, default=2, help="processes on this box (ignored with --hostfile)")
    tr.add_argument("--hostfile", help="deepspeed hostfile (default: this box with --nproc slots)")
    tr.add_argument("--master_port", type=int, default=None)
    tr.add_argument("--dry-run", action="store_true", help="print the launch command only")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.name=dgpo")
    sub.add_parser("list", help="list losses, gates, rewards, dataset presets")
    cf = sub.add_parser("config", help="print the resolved config")
    cf.add_argument("--config", action="append")
    cf.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        return cmd_list()
    from rlengine.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, args.overrides)  # fail on config errors before launching
    except ConfigError as e:
        print(f"rlengine: config error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "config":
        print(to_yaml(cfg), end="")
        return 0
    from rlengine.hosts import HostCheckError

    try:
        cmd = launch_command(args.config, args.overrides, args.nproc, args.hostfile, args.master_port,
                             check=not args.dry_run, socket_ifname=cfg.run.socket_ifname)
    except (FileNotFoundError, HostCheckError) as e:
        print(f"rlengine: {e}", file=sys.stderr)
        return 2
    print("rlengine: " + " ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(TRAIN_SCRIPT.parent.parent))
    # pdsh's ssh to a node whose link died would wait for TCP's own give-up (many minutes):
    # ssh's keep-alives end it within 3 x 5 s (what the multi-node link-down test measures)
    env.setdefault("PDSH_SSH_ARGS_APPEND", SSH_KEEPALIVE)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())

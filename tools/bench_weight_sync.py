"""Benchmark: a full weight push of the embedded default through rlengine's path vs one raw broadcast.

Two spawned processes on loopback, one gloo group, `--threads` (1) torch threads each (`--backend nccl`: one NCCL group,
rank r on GPU r, the trainer's weights on its GPU as under ZeRO-3). Per repeat, on the same group:
  raw       one `dist.broadcast` of a single flat uint8 tensor holding as many bytes as the push
  rlengine  `WeightBroadcaster.push(iter_gathered_params(model))` -> `.receive(apply_fn)` with an
            apply_fn that only reports the names (the transport path: packing, finiteness check,
            checksums on both sides, verification, outcome exchange; not a sampler's reload)
Medians over the repeats; the target is rlengine >= 80% of raw. Also reported: CPU seconds per push
of each process (all its threads), which shows the work the packing, finiteness check and checksums
add whatever else the machine is doing.

    python tools/bench_weight_sync.py [--model embedded] [--dtype fp32] [--bucket-mb 64] [--repeats 5]
                                      [--backend gloo|nccl] [--threads 1]

NCCL needs two GPUs: it refuses two ranks on one device ("Duplicate GPU detected").

Last stdout line: {"raw": {"gbps": ...}, "rlengine": {"gbps": ..., "seconds": ...}, ...}
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads))
    torch.set_num_threads(args.threads)
    import datetime

    import torch.distributed as dist

    from rlengine.model import resolve_model_path
    from rlengine.weight_sync import WeightBroadcaster, iter_gathered_params, new_sync_group

    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=300))
    group = new_sync_group([0, 1], timeout_s=300, backend=args.backend)
    bc = WeightBroadcaster(group, src_rank=0, bucket_mb=args.bucket_mb, timeout_s=300, device=device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = None
    if rank == 0:  # the real policy module, as the trainer holds it
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=dtype).to(device)
        nbytes = torch.tensor([sum(p.numel() * p.element_size() for p in model.parameters())], device=device)
    else:
        nbytes = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(nbytes, src=0, group=group)
    flat = torch.zeros(int(nbytes), dtype=torch.uint8, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def stream():
        return iter_gathered_params(model)

    raw, ours, cpu_raw, cpu_ours = [], [], [], []
    for rep in range(args.repeats + 1):  # repeat 0 warms up both paths
        dist.barrier(group=group)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        dist.broadcast(flat, src=0, group=group)
        sync()
        t_raw, c_raw = time.perf_counter() - t0, time.process_time() - c0
        dist.barrier(group=group)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = bc.push(stream()) if rank == 0 else bc.receive(lambda pairs: [n for n, _ in pairs])
        sync()
        t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
        if rep:
            raw.append(t_raw)
            ours.append((t_ours, metrics))
            cpu_raw.append(c_raw)
            cpu_ours.append(c_ours)
    # CPU seconds (all threads of the process) per push, [sender, receiver]: the work the checks
    # add, independent of how busy the machine is
    cpu = torch.tensor([[statistics.median(cpu_raw), statistics.median(cpu_ours)]] * 2, dtype=torch.float64,
                       device=device)
    mine = cpu[rank].clone()
    cpu[1 - rank] = 0
    cpu[rank] = mine
    dist.all_reduce(cpu, group=group)
    if rank == 0:
        pushed = ours[0][1]["sync/bytes"]
        raw_s = statistics.median(raw)
        our_s = statistics.median(t for t, _ in ours)
        result = {"raw": {"gbps": float(nbytes) / raw_s / 1e9, "seconds": raw_s, "bytes": int(nbytes)},
                  "rlengine": {"gbps": pushed / our_s / 1e9, "seconds": our_s, "bytes": int(pushed),
                               "num_buckets": int(ours[0][1]["sync/num_buckets"])},
                  "ratio": (pushed / our_s) / (float(nbytes) / raw_s),
                  "cpu_seconds": {"raw": {"sender": cpu[0, 0].item(), "receiver": cpu[1, 0].item()},
                                  "rlengine": {"sender": cpu[0, 1].item(), "receiver": cpu[1, 1].item()}},
                  "config": {"model": args.model, "dtype": args.dtype, "bucket_mb": args.bucket_mb,
                             "repeats": args.repeats, "threads_per_rank": args.threads, "backend": args.backend,
                             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier(group=group)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--bucket-mb", type=float, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(_free_port(), args, out), nprocs=2, join=True, start_method="spawn")
        with open(out) as f:
            result = json.load(f)
    print(f"raw broadcast {result['raw']['gbps']:.2f} GB/s | rlengine push {result['rlengine']['gbps']:.2f} GB/s "
          f"({result['rlengine']['seconds']:.3f} s, {result['rlengine']['num_buckets']} buckets) | "
          f"ratio {result['ratio']:.2f}", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

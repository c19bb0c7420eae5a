"""Trainer -> sampler weight push: ZeRO-3 gathering, bucketed broadcast with checksums, the probe.

Owns:
  * `iter_gathered_params(model)`: (HF name, full tensor) pairs, ZeRO-3 parameters gathered one
    layer at a time (one `GatheredParameters` context per layer), plain parameters as they are.
  * `WeightBroadcaster(group, src_rank)`: `.push(named_tensors)` on the source (trainer rank 0),
    `.receive(apply_fn)` on the rollout ranks of a dedicated process group (gloo on CPU, NCCL on
    GPU; `new_sync_group` builds one with a timeout).
  * `local_push(sampler, named_tensors)`: the colocated placement (no broadcast). A sampler
    that `consumes_weights_lazily` gets the gathered tensors themselves, one at a time (no copy
    of the model); any other gets copies, all checked before it sees one.
  * `tensor_digest` / `WeightsDigest` / `digesting(stream)`: the digest of what a push sends (the
    trainer, as the tensors go out) and of what a sampler loaded (the sampler, from what it holds
    or received); `placement.verify_push` compares the two.
  * `write_safetensors(path, named_tensors, manifest)`: a safetensors file written tensor by
    tensor as they arrive (the header comes from the manifest), for a sampler in another process.
  * `probe_gap(...)` / `probe_abs_diff(...)`: mean |sampler log-prob - trainer log-prob| on a fixed
    sequence (the latter scores it with an in-process sampler first).

Wire protocol of one push (all collectives on `group`; every wait is bounded by `timeout_s`, the
manifest's object broadcast by the group's own timeout, which `new_sync_group` sets):
  1. header  int64[4]  [magic, manifest hash, manifest follows?, bucket bytes]
  2. manifest (names, shapes, dtypes) as one object broadcast: only on the first push of a run or
     when it changed since the last push.
  3. the weights as one virtual byte stream (each tensor at a 64-byte aligned offset, manifest
     order) cut into fixed-size buckets. The source packs bucket k+1 (copy, finiteness check,
     xxh3_64 on CPU, `_device_checksum` on GPU; done 1 MB at a time so each byte is read from DRAM once) while bucket k is in
     flight (two staging buffers, async broadcasts); receivers
     receive straight into one flat buffer, so every tensor is a view of it and no unpacking copy
     is made; they hash each bucket as it lands.
  4. trailer int64[2 + buckets]  [status, entry index, the source's per-bucket checksums]: status
     != 0 means the source refused the push (a non-finite value, or the stream disagreed with the
     manifest) at that entry; the remaining buckets were still sent, unpacked, so that both sides
     issue the same collectives.
  5. receivers compare checksums, then call `apply_fn` once with every (name, tensor) (all at once:
     vLLM needs fused q/k/v and gate/up in one reload) and check that the names it reports loaded
     equal the names sent.
  6. outcome all_reduce(MAX) int64[3]  [buckets - first bad bucket, names mismatch, apply failed]:
     everyone learns the verdict, so every side raises `WeightSyncError` (naming the first tensor
     of the bad bucket) or none does, and nobody is left waiting.
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_MAGIC = 0x524C5753  # "RLWS"
_ALIGN = 64
DEFAULT_LAYER_REGEX = r"^(.*?\.)?layers\.\d+\."


class WeightSyncError(RuntimeError):
    """A weight push failed (bad checksum, name mismatch, non-finite value, timeout).

    `metrics` holds what can still be logged for the failed step (`sync/buckets_verified` = 0.0
    when a bucket checksum did not match)."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


# ------------------------------------------------------------------------------------------------
# What is sent
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "bfloat16", ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.torch_dtype.itemsize


def _spec(name: str, shape, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec(name, tuple(int(s) for s in shape), str(dtype).removeprefix("torch."))


def manifest_of(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [_spec(n, t.shape, t.dtype) for n, t in named_tensors]


def manifest_hash(manifest: Sequence[TensorSpec]) -> int:
    """A 63-bit digest of the manifest (fits an int64 header slot)."""
    text = "\n".join(f"{s.name}|{s.shape}|{s.dtype}" for s in manifest).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def manifest_mismatch(spec: TensorSpec, name: str, t: torch.Tensor) -> str | None:
    """Why the streamed (name, tensor) is not the manifest entry `spec` it stands for, or None."""
    if name == spec.name and tuple(t.shape) == spec.shape and t.dtype == spec.torch_dtype:
        return None
    return (f"tensor {name!r} {tuple(t.shape)} {t.dtype} does not match the manifest entry "
            f"{spec.name!r} {spec.shape} {spec.dtype}")


class ParamStream:
    """An iterable of (name, tensor) that also knows its manifest before it is iterated."""

    def __init__(self, manifest: list[TensorSpec], make_iter: Callable[[], Iterator[tuple[str, torch.Tensor]]]):
        self.manifest = manifest
        self._make_iter = make_iter

    def __iter__(self):
        return self._make_iter()


def _hf_name(name: str) -> str:
    return name.removeprefix("module.")


def iter_gathered_params(model: torch.nn.Module, layer_prefix_regex: str = DEFAULT_LAYER_REGEX) -> ParamStream:
    """(HF name, full tensor) for every parameter, in `named_parameters()` order.

    ZeRO-3 partitioned parameters are gathered one layer at a time: all parameters whose names
    share a `layer_prefix_regex` match (e.g. `model.layers.7.`) go through one
    `deepspeed.zero.GatheredParameters` context (one fused all-gather); other parameters form
    one group each. A yielded tensor is valid only until the next one is requested (consume or
    copy it at once). Gathering is a collective of the data-parallel group: every trainer rank
    must iterate the stream to the end, not only the one that sends.
    """
    pattern = re.compile(layer_prefix_regex)
    params = list(model.named_parameters())
    manifest = [_spec(_hf_name(n), getattr(p, "ds_shape", p.shape), p.dtype) for n, p in params]

    groups: list[list[tuple[str, torch.nn.Parameter]]] = []
    last_key = None
    for name, p in params:
        m = pattern.match(_hf_name(name))
        key = m.group(0) if m else None
        if key is not None and key == last_key:
            groups[-1].append((name, p))
        else:
            groups.append([(name, p)])
        last_key = key

    def generate():
        for group in groups:
            partitioned = [p for _, p in group if hasattr(p, "ds_id")]
            if partitioned:
                import deepspeed

                with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                    for name, p in group:
                        yield _hf_name(name), p.data
            else:
                for name, p in group:
                    yield _hf_name(name), p.data

    return ParamStream(manifest, generate)


@dataclass
class _Layout:
    """Where each tensor lives in the byte stream and how the stream is cut into buckets."""

    manifest: list[TensorSpec]
    offsets: list[int]
    total: int
    bucket_bytes: int

    @classmethod
    def build(cls, manifest: list[TensorSpec], bucket_bytes: int) -> "_Layout":
        offsets, pos = [], 0
        for spec in manifest:
            offsets.append(pos)
            pos += -(-spec.nbytes // _ALIGN) * _ALIGN
        return cls(manifest, offsets, pos, bucket_bytes)

    @property
    def num_buckets(self) -> int:
        return max(1, -(-self.total // self.bucket_bytes))

    def bucket_range(self, k: int) -> tuple[int, int]:
        return k * self.bucket_bytes, min((k + 1) * self.bucket_bytes, self.total)

    def first_entry_in_bucket(self, k: int) -> int:
        """Index of the first tensor with bytes in bucket k."""
        start, _ = self.bucket_range(k)
        for i, spec in enumerate(self.manifest):
            if self.offsets[i] + spec.nbytes > start:
                return i
        return len(self.manifest) - 1


def new_sync_group(ranks: list[int], timeout_s: float, backend: str | None = None):
    """A dedicated process group for weight pushes (NCCL when CUDA is available, else gloo).

    Collective over the default group: every rank of the world must call it, in the same order."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    return dist.new_group(ranks=ranks, backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def _checksum(buf: torch.Tensor) -> int:
    """xxh3_64 of a CPU byte buffer; on GPU `_device_checksum` (computed where the bytes are)."""
    if buf.is_cuda:
        return _device_checksum(buf)
    import xxhash

    return xxhash.xxh3_64_intdigest(memoryview(buf.numpy()))


_MASK64 = (1 << 64) - 1


def _as_int64(u: int) -> int:
    u &= _MASK64
    return u - (1 << 64) if u >= (1 << 63) else u


_MIX1, _MIX2 = _as_int64(0xBF58476D1CE4E5B9), _as_int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 words (multiplication wraps mod 2^64): a bijection that
    spreads every input bit over the whole word."""
    x = x ^ _shr(x, 30)
    x = x * _MIX1
    x = x ^ _shr(x, 27)
    x = x * _MIX2
    return x ^ _shr(x, 31)


def _device_checksum(buf: torch.Tensor) -> int:
    """A position-sensitive digest of a byte buffer (length a multiple of 8) computed on its own
    device: the wrapping sum of mix(word_i XOR mix(i)). A plain sum of the words (the old GPU
    digest) does not change when two words trade places; here each word is bound to its index."""
    words = buf.view(torch.int64)                                             # [N]
    index = torch.arange(words.numel(), dtype=torch.int64, device=buf.device)   # [N]
    return int(_mix64(words ^ _mix64(index)).sum())


_PIECE_BYTES = 1 << 20  # packing granularity: small enough to stay in cache between copy, check and hash


class _BucketHasher:
    """The bucket checksum, fed progressively while packing (CPU: streaming xxh3_64, the same digest
    as `_checksum` of the whole bucket; GPU: computed once at the end, on device)."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.done = 0
        self.state = None
        if not buf.is_cuda:
            import xxhash

            self.state = xxhash.xxh3_64()
            self.array = buf.numpy()

    def update_to(self, end: int) -> None:
        if self.state is not None and end > self.done:
            self.state.update(memoryview(self.array[self.done:end]))
            self.done = end

    def finish(self, size: int) -> int:
        if self.state is None:
            return _checksum(self.buf[:size])
        self.update_to(size)
        return self.state.intdigest()


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. Fast path: a sum is finite when every element is (one cheap pass);
    only a non-finite sum (a real NaN/Inf, or an overflow) pays for the exact min/max test."""
    if bool(torch.isfinite(t.sum())):
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates into both
    return bool(torch.isfinite(lo) and torch.isfinite(hi))




# ------------------------------------------------------------------------------------------------
# The broadcaster
# ------------------------------------------------------------------------------------------------
class WeightBroadcaster:
    """Bucketed, checksummed broadcast of named tensors from `src_rank` to the rest of `group`.

    `src_rank` is a global rank. Metrics returned by push/receive: `sync/seconds`, `sync/gbps`,
    `sync/bytes`, `sync/num_buckets`, `sync/buckets_verified` (buckets whose checksum the receivers
    matched: all of them, since a mismatch raises instead), and on
    receivers `sync/apply_seconds`."""

    def __init__(self, group, src_rank: int, bucket_mb: float = 64, timeout_s: float = 300.0,
                 device: torch.device | str | None = None):
        self.group = group
        self.src_rank = src_rank
        self.bucket_bytes = max(_ALIGN, int(bucket_mb * (1 << 20)) // _ALIGN * _ALIGN)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        backend = dist.get_backend(group)
        self.device = torch.device(device if device is not None else ("cuda" if backend == "nccl" else "cpu"))
        self._sent_hash: int | None = None
        self._manifest: list[TensorSpec] | None = None
        self._recv_hash: int | None = None
        self._flat: torch.Tensor | None = None
        self._staging: list[torch.Tensor] = []

    # -- helpers ------------------------------------------------------------------------------
    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timeout=self.timeout)
        except Exception as e:  # gloo raises on timeout / peer loss
            raise WeightSyncError(f"weight sync: {what} did not complete within {self.timeout_s:.0f}s "
                                  f"(is every rank of the sync group calling push/receive?): {e}") from e
        if ok is False:
            raise WeightSyncError(f"weight sync: {what} did not complete within {self.timeout_s:.0f}s")

    def _bcast(self, t: torch.Tensor, what: str, wait: bool = True):
        work = dist.broadcast(t, src=self.src_rank, group=self.group, async_op=True)
        if wait:
            self._wait(work, what)
        return work

    def _exchange_outcome(self, bad_bucket: int | None, num_buckets: int, names_bad: bool, apply_failed: bool):
        code = torch.tensor([0 if bad_bucket is None else num_buckets - bad_bucket, int(names_bad), int(apply_failed)],
                            dtype=torch.int64, device=self.device)
        work = dist.all_reduce(code, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._wait(work, "outcome exchange")
        code = code.cpu().tolist()
        return (None if code[0] == 0 else num_buckets - code[0]), bool(code[1]), bool(code[2])

    @staticmethod
    def _verdict(layout: _Layout, bad_bucket, names_bad, apply_failed, side: str) -> None:
        if bad_bucket is not None:
            name = layout.manifest[layout.first_entry_in_bucket(bad_bucket)].name
            raise WeightSyncError(f"weight sync ({side}): checksum mismatch in bucket {bad_bucket} "
                                  f"(first tensor {name!r}); the push is aborted", {"sync/buckets_verified": 0.0})
        if names_bad:
            raise WeightSyncError(f"weight sync ({side}): the sampler loaded a different set of tensors than was sent")
        if apply_failed:
            raise WeightSyncError(f"weight sync ({side}): a rollout rank failed to load the pushed weights")

    # -- source -------------------------------------------------------------------------------
    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | ParamStream) -> dict:
        """Send every tensor (on `src_rank`). Raises WeightSyncError on any failure, anywhere."""
        t0 = time.perf_counter()
        if isinstance(named_tensors, ParamStream):
            manifest, stream = named_tensors.manifest, iter(named_tensors)
        else:
            pairs = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
            manifest, stream = manifest_of(pairs), iter(pairs)
        layout = _Layout.build(manifest, self.bucket_bytes)
        digest = manifest_hash(manifest)
        changed = digest != self._sent_hash
        header = torch.tensor([_MAGIC, digest, int(changed), self.bucket_bytes], dtype=torch.int64, device=self.device)
        self._bcast(header, "header broadcast")
        if changed:
            obj = [[(s.name, s.shape, s.dtype) for s in manifest]]
            dist.broadcast_object_list(obj, src=self.src_rank, group=self.group, device=self.device)
            self._sent_hash = digest

        nb = layout.num_buckets
        if len(self._staging) != 2 or self._staging[0].numel() < self.bucket_bytes:
            self._staging = [torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        works: list = [None, None]
        checksums: list[int] = []
        refused: tuple[int, str] | None = None  # (entry index, reason)
        entry = 0          # index (in the manifest) of the tensor being packed or next to pack
        cur_bytes: torch.Tensor | None = None  # that tensor's bytes, while it is being packed
        cur_pos = 0        # bytes of it already packed

        def take_next_tensor() -> bool:
            nonlocal cur_bytes, cur_pos, refused
            spec = layout.manifest[entry]
            try:
                name, t = next(stream)
            except StopIteration:
                refused = (entry, f"the tensor stream ended before {spec.name!r}")
                return False
            mismatch = manifest_mismatch(spec, name, t)
            if mismatch:
                refused = (entry, mismatch)
                return False
            cur_bytes = t.detach().contiguous().reshape(-1).view(torch.uint8)
            cur_pos = 0
            return True

        for k in range(nb):
            lo, hi = layout.bucket_range(k)
            buf = self._staging[k % 2]
            if works[k % 2] is not None:  # the buffer's previous bucket must be out before reuse
                self._wait(works[k % 2], f"bucket {k - 2} broadcast")
            # Packing goes in cache-sized pieces: each piece is copied, checked for non-finite values
            # and fed to the bucket's checksum while it is still in cache (one DRAM pass, not three).
            hasher = _BucketHasher(buf)
            while refused is None:
                if cur_bytes is None:
                    if entry >= len(layout.manifest) or layout.offsets[entry] >= hi:
                        break  # nothing left, or the next tensor starts in a later bucket
                    if not take_next_tensor():
                        break
                dst = layout.offsets[entry] + cur_pos  # position in the byte stream
                take = min(cur_bytes.numel() - cur_pos, hi - dst, _PIECE_BYTES)
                piece = buf[dst - lo: dst - lo + take]
                piece.copy_(cur_bytes[cur_pos: cur_pos + take])
                dtype = layout.manifest[entry].torch_dtype
                if dtype.is_floating_point and take and not _all_finite(piece.view(dtype)):
                    refused = (entry, f"tensor {layout.manifest[entry].name!r} holds non-finite values "
                                      f"(NaN/Inf); refusing to push it")
                hasher.update_to(dst - lo + take)
                cur_pos += take
                if cur_pos >= cur_bytes.numel():
                    cur_bytes, entry = None, entry + 1
                if dst + take >= hi:
                    break
            view = buf[: hi - lo]
            checksums.append(hasher.finish(hi - lo))
            # a refused push still sends every bucket (unloaded: the trailer says so), keeping both
            # sides' collectives in step
            works[k % 2] = self._bcast(view, f"bucket {k} broadcast", wait=False)

        for w in works:
            if w is not None:
                self._wait(w, "last bucket broadcast")
        if refused is not None:  # drain the stream: ZeRO-3 gathering is collective across trainer ranks
            for _ in stream:
                pass
        if refused is None:
            try:  # a stream longer than the manifest is a mismatch too
                extra = next(stream)
                refused = (len(layout.manifest) - 1, f"unexpected extra tensor {extra[0]!r} after the manifest")
            except StopIteration:
                pass
        status = 0 if refused is None else 1
        trailer = torch.tensor([status, refused[0] if refused else -1] + [_as_int64(c) for c in checksums],
                               dtype=torch.int64, device=self.device)
        self._bcast(trailer, "checksum broadcast")
        if refused is not None:
            self._exchange_outcome(None, nb, False, False)
            raise WeightSyncError(f"weight sync (sender): {refused[1]}")
        bad, names_bad, apply_failed = self._exchange_outcome(None, nb, False, False)
        self._verdict(layout, bad, names_bad, apply_failed, "sender")
        seconds = time.perf_counter() - t0
        return {"sync/seconds": seconds, "sync/gbps": layout.total / seconds / 1e9, "sync/bytes": float(layout.total),
                "sync/num_buckets": float(nb), "sync/buckets_verified": float(nb)}

    # -- receivers ----------------------------------------------------------------------------
    def receive(self, apply_fn: Callable[[list[tuple[str, torch.Tensor]]], Iterable[str] | None]) -> dict:
        """Receive one push and hand every (name, tensor) to `apply_fn` once, after all checksums
        matched. The tensors are views of a buffer reused by the next push: copy what you keep.
        `apply_fn` returns the names it loaded (or a sampler's `LoadReport`; None = all of them)."""
        t0 = time.perf_counter()
        header = torch.zeros(4, dtype=torch.int64, device=self.device)
        self._bcast(header, "header broadcast (waiting for the trainer's push)")
        magic, digest, changed, bucket_bytes = header.cpu().tolist()
        if magic != _MAGIC:
            raise WeightSyncError(f"weight sync (receiver): bad header {header.tolist()}: the sides are out of step")
        if changed:
            obj = [None]
            dist.broadcast_object_list(obj, src=self.src_rank, group=self.group, device=self.device)
            self._manifest = [TensorSpec(n, tuple(s), d) for n, s, d in obj[0]]
            self._recv_hash = digest
        if self._manifest is None or digest != self._recv_hash:
            raise WeightSyncError("weight sync (receiver): no manifest for this push (receiver joined late?)")
        layout = _Layout.build(self._manifest, bucket_bytes)
        if self._flat is None or self._flat.numel() != layout.total:
            self._flat = torch.empty(layout.total, dtype=torch.uint8, device=self.device)
        nb = layout.num_buckets
        works = []
        for k in range(nb):
            lo, hi = layout.bucket_range(k)
            works.append(self._bcast(self._flat[lo:hi], f"bucket {k} broadcast", wait=False))
        local: list[int] = []
        for k in range(nb):
            self._wait(works[k], f"bucket {k} broadcast")
            lo, hi = layout.bucket_range(k)
            local.append(_checksum(self._flat[lo:hi]))
        trailer = torch.zeros(2 + nb, dtype=torch.int64, device=self.device)
        self._bcast(trailer, "checksum broadcast")
        status, entry, *sent = trailer.cpu().tolist()
        if status != 0:
            self._exchange_outcome(None, nb, False, False)
            name = layout.manifest[entry].name if 0 <= entry < len(layout.manifest) else "?"
            raise WeightSyncError(f"weight sync (receiver): the trainer refused the push at tensor {name!r}")
        bad = next((k for k in range(nb) if _as_int64(local[k]) != sent[k]), None)
        names_bad = apply_failed = False
        apply_seconds = 0.0
        error: BaseException | None = None
        if bad is None:
            views = [(s.name, self._flat[off: off + s.nbytes].view(s.torch_dtype).view(s.shape))
                     for s, off in zip(layout.manifest, layout.offsets)]
            ta = time.perf_counter()
            try:
                loaded = apply_fn(views)
                loaded = getattr(loaded, "names", loaded)   # a sampler's LoadReport, or plain names
                if loaded is not None:
                    loaded = set(loaded)
                    sent_names = {s.name for s in layout.manifest}
                    if loaded != sent_names:
                        names_bad = True
                        diff = sorted(sent_names ^ loaded)
                        log.error("weight sync: loaded != sent; first difference %r (%d differ)", diff[0], len(diff))
            except BaseException as e:  # report to everyone, then re-raise below
                apply_failed, error = True, e
            apply_seconds = time.perf_counter() - ta
        bad, names_bad, apply_failed = self._exchange_outcome(bad, nb, names_bad, apply_failed)
        if error is not None:
            raise WeightSyncError(f"weight sync (receiver): loading the pushed weights failed: {error}") from error
        self._verdict(layout, bad, names_bad, apply_failed, "receiver")
        seconds = time.perf_counter() - t0
        return {"sync/seconds": seconds, "sync/gbps": layout.total / seconds / 1e9, "sync/bytes": float(layout.total),
                "sync/num_buckets": float(nb), "sync/buckets_verified": float(nb),
                "sync/apply_seconds": apply_seconds}


# ------------------------------------------------------------------------------------------------
# Colocated placement and the probe
# ------------------------------------------------------------------------------------------------
def local_push(sampler, named_tensors: Iterable[tuple[str, torch.Tensor]] | ParamStream):
    """Load weights into a sampler in this process (colocated placement); returns the sampler's
    `LoadReport` and the transfer metrics. Whether the sampler loaded what was sent (names, digest)
    is decided by `placement.verify_push`, for both placements alike.

    Non-finite tensors are refused (WeightSyncError naming the tensor). Two ways, chosen by the
    sampler's `consumes_weights_lazily`:
      * lazily: the sampler gets a stream (with the manifest when the input has one) of the
        trainer's own tensors, each checked just before it is handed over; the sampler copies
        each out before asking for the next, so at most one gathered ZeRO-3 layer is alive
        beside the sampler's copy. A refused tensor raises inside the sampler's load, which must
        then leave the engine untouched (the vLLM file transport loads nothing before the end).
      * eagerly: every tensor is copied (the trainer keeps updating its own) and checked before
        the sampler sees any of them.
    The input is always iterated to its end, also after an error: ZeRO-3 gathering is collective."""
    t0 = time.perf_counter()
    nbytes = 0

    def checked(stream):
        nonlocal nbytes
        for name, t in stream:
            t = t.detach()
            if t.is_floating_point() and t.numel() and not _all_finite(t):
                raise WeightSyncError(f"weight sync: tensor {name!r} holds non-finite values (NaN/Inf); "
                                      "refusing to push it")
            nbytes += t.numel() * t.element_size()
            yield name, t

    source = iter(named_tensors)
    try:
        if getattr(sampler, "consumes_weights_lazily", False):
            manifest = getattr(named_tensors, "manifest", None)
            stream = checked(source)
            report = sampler.load_weights(stream if manifest is None else ParamStream(manifest, lambda: stream))
        else:
            report = sampler.load_weights([(name, t.clone()) for name, t in checked(source)])
    finally:
        for _ in source:   # a sampler that stopped early, or a refused tensor: finish the gathers
            pass
    seconds = time.perf_counter() - t0
    return report, {"sync/seconds": seconds, "sync/gbps": nbytes / seconds / 1e9, "sync/bytes": float(nbytes),
                    "sync/num_buckets": 0.0}


# ------------------------------------------------------------------------------------------------
# What a sampler holds: the digest both sides compute
# ------------------------------------------------------------------------------------------------
def tensor_digest(name: str, t: torch.Tensor) -> int:
    """xxh3_64 of a tensor's name, shape, dtype and bytes (a GPU tensor is copied to the CPU first:
    one definition for every device, so a CPU sampler and a GPU trainer agree)."""
    import xxhash

    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    h = xxhash.xxh3_64(f"{name}|{tuple(data.shape)}|{data.dtype}".encode())
    h.update(memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.intdigest()


class WeightsDigest:
    """The digest of a set of named tensors: the sum mod 2^64 of their `tensor_digest`s. Order-free
    (a sampler may load in its own order); each term binds a tensor's bytes to its name and to
    their positions, so a changed, dropped, renamed or reordered-within tensor changes it."""

    def __init__(self):
        self.value = 0
        self.count = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        self.value = (self.value + tensor_digest(name, t)) & _MASK64
        self.count += 1


def weights_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    digest = WeightsDigest()
    for name, t in named_tensors:
        digest.add(name, t)
    return digest.value


def digesting(named_tensors: Iterable[tuple[str, torch.Tensor]] | ParamStream):
    """(the same tensors as a ParamStream, a WeightsDigest filled as they are iterated): the
    trainer's side of a push's digest, computed from the tensors on their way out."""
    digest = WeightsDigest()
    manifest = getattr(named_tensors, "manifest", None)
    if manifest is None:
        pairs = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        manifest, named_tensors = manifest_of(pairs), pairs

    def generate():
        for name, t in named_tensors:
            digest.add(name, t)
            yield name, t

    return ParamStream(manifest, generate), digest


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str, named_tensors: Iterable[tuple[str, torch.Tensor]],
                      manifest: Sequence[TensorSpec]) -> int:
    """Write `named_tensors` to `path` in the safetensors format, one tensor at a time as the
    iterable yields them (each is copied out before the next is requested); returns the bytes of
    tensor data. The header is built from `manifest` up front; a tensor that disagrees with its
    manifest entry, or a stream that ends early or runs long, raises WeightSyncError naming it
    (the partial file is left for the caller to remove)."""
    import json

    header, offset = {}, 0
    for spec in manifest:
        dtype = spec.torch_dtype
        if dtype not in _SAFETENSORS_DTYPES:
            raise WeightSyncError(f"weight sync: tensor {spec.name!r} has dtype {spec.dtype}, "
                                  "which safetensors cannot hold")
        header[spec.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    if len(header) != len(manifest):
        raise WeightSyncError("weight sync: the manifest names a tensor twice")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # the data section starts 8-byte aligned
    stream = iter(named_tensors)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for spec in manifest:
            try:
                name, t = next(stream)
            except StopIteration:
                raise WeightSyncError(f"weight sync: the tensor stream ended before {spec.name!r}") from None
            mismatch = manifest_mismatch(spec, name, t)
            if mismatch:
                raise WeightSyncError(f"weight sync: {mismatch}")
            f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        extra = next(stream, None)
        if extra is not None:
            raise WeightSyncError(f"weight sync: tensor {extra[0]!r} is not in the manifest")
    return offset


def probe_gap(sampler_logprobs, trainer_logprobs, threshold: float | None = None) -> float:
    """Mean |sampler log-prob - trainer log-prob| over the probe's response tokens ([T] each).

    The one definition of `sync/probe_abs_diff`, whichever rank computed the sampler's side.
    Logs a warning above `threshold`."""
    sampler_lp = torch.as_tensor(sampler_logprobs, dtype=torch.float64).reshape(-1)
    trainer_lp = torch.as_tensor(trainer_logprobs, dtype=torch.float64).reshape(-1)
    if sampler_lp.shape != trainer_lp.shape:
        raise WeightSyncError(f"probe: sampler gave {sampler_lp.numel()} log-probs, trainer {trainer_lp.numel()}")
    diff = float((sampler_lp - trainer_lp).abs().mean()) if sampler_lp.numel() else 0.0
    if threshold is not None and diff > threshold:
        log.warning("weight sync probe: sampler/trainer log-prob gap %.4f exceeds %.4f (stale or wrong weights?)",
                    diff, threshold)
    return diff


def probe_abs_diff(sampler, trainer_logprobs_fn: Callable[[list[int], list[int]], torch.Tensor | list[float]],
                   probe_prompt_ids: list[int], probe_response_ids: list[int], threshold: float | None = None,
                   temperature: float = 1.0) -> dict:
    """`probe_gap` of a fixed sequence scored by an in-process `sampler` after a push.

    `trainer_logprobs_fn(prompt_ids, response_ids)` returns the trainer's log-probs of the
    response tokens ([T]) at `temperature`."""
    sampler_lp = sampler.score(probe_prompt_ids, probe_response_ids, temperature)
    trainer_lp = trainer_logprobs_fn(probe_prompt_ids, probe_response_ids)
    return {"sync/probe_abs_diff": probe_gap(sampler_lp, trainer_lp, threshold)}

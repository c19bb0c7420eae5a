"""RewardPool: scores completions in worker processes with a hard per-item timeout.

Why processes: math-verify's timeouts use SIGALRM (main thread only) and cannot interrupt a long
C-level call, so a pathological answer (`9^{9^{9^{9}}}`) can only be bounded by killing the
process that verifies it. Each worker is a fresh interpreter (`python -m rlengine.rewards._worker`,
not fork: safe beside torch / DeepSpeed threads, and the trainer's main module is never re-imported
there) that imports math-verify only, with OMP_NUM_THREADS=1. Workers start, import and warm up
at construction, so the first batch is not charged for it.

Per batch: items go out in small chunks to idle workers; a worker answers item by item, so the
pool knows which item is running and since when. An item running longer than `timeout_s` scores 0
(total and parts) and counts in `stats["timeouts"]`; its worker is killed and replaced (the
replacement warms up in the background) and the rest of its chunk goes back to the queue. A reward
that raises scores 0 and counts in `errors`; a worker that dies (segfault, os._exit) scores its
current item 0, counts in `errors` and `crashes`, and is replaced. Optional `batch_timeout_s`
bounds a whole batch: items still unscored then score 0 and count as timeouts.
`num_workers=0` scores in the calling process (no hard timeout: for tests and small evaluations).

Communication is JSON lines over pipes: model output is data, never `eval`-ed, `exec`-ed or
unpickled.
"""
from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from rlengine.rewards.registry import RewardSpec, get_reward

_READY_TIMEOUT_S = 120.0      # a worker that has not warmed up by then is a broken environment
_MAX_FAILED_STARTS = 5        # consecutive workers that die before ready -> give up
_COALESCE_S = 0.004           # parent naps this long between reads while every worker is busy


@dataclass
class _Batch:
    """The state of one `score` call."""

    spec: RewardSpec
    results: list                                   # [N] dict or None (not scored yet)
    queue: deque = field(default_factory=deque)     # item ids waiting for a worker
    done: int = 0

    def set(self, item_id: int, value: dict[str, float]) -> None:
        if self.results[item_id] is None:
            self.done += 1
        self.results[item_id] = value


@dataclass
class _Worker:
    proc: subprocess.Popen
    to_worker: int                  # write end of the request pipe
    from_worker: int                # read end of the reply pipe
    started: float                  # process start (monotonic)
    ready: bool = False
    buffer: bytes = b""
    pending: deque = field(default_factory=deque)   # item ids sent, not answered, in order
    outbox: bytes = b""             # request bytes not yet accepted by the (non-blocking) pipe
    item_started: float = 0.0       # when the head of `pending` began (last reply or dispatch)


class RewardPool:
    """Fault-tolerant reward scoring; see the module docstring.

    >>> with RewardPool(num_workers=2, timeout_s=5.0) as pool:
    ...     pool.score(["<answer>2</answer>"], ["2"], reward="answer")
    [1.0]
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, *,
                 batch_timeout_s: float | None = None, chunk_size: int = 8):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.batch_timeout_s = batch_timeout_s
        self.chunk_size = max(1, int(chunk_size))
        self.stats: dict = {"items": 0, "batches": 0, "timeouts": 0, "errors": 0, "crashes": 0,
                            "restarts": 0, "last_error": ""}
        self._workers: list[_Worker] = []
        self._failed_starts = 0
        self._closed = False
        for _ in range(num_workers):
            self._workers.append(self._spawn())
        self._wait_all_ready()

    # ------------------------------------------------------------------ public API
    def score(self, texts: list[str], ground_truths: list[str], reward: str = "answer_format") -> list[float]:
        """The total reward of each item (0.0 for items that timed out or failed)."""
        return [d["reward"] for d in self.score_detailed(texts, ground_truths, reward=reward)]

    def score_detailed(self, texts: list[str], ground_truths: list[str],
                       reward: str = "answer_format") -> list[dict[str, float]]:
        """Per item `{"reward": total, <part>: value, ...}` (parts as the reward declares them)."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        if len(texts) != len(ground_truths):
            raise ValueError(f"{len(texts)} texts but {len(ground_truths)} ground truths")
        spec = get_reward(reward)
        if spec.ref.startswith("__main__:") and self.num_workers > 0:
            raise ValueError(f"reward {reward!r} is defined in __main__, which worker processes cannot "
                             "import; define it in a module and name it 'module:function'")
        items = [(i, str(t), str(g)) for i, (t, g) in enumerate(zip(texts, ground_truths))]
        self.stats["batches"] += 1
        self.stats["items"] += len(items)
        if self.num_workers == 0:
            return [self._score_inline(spec, text, gt) for _, text, gt in items]
        return self._score_in_workers(spec, items)

    def close(self) -> None:
        """Stop every worker (politely, then by force)."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                os.write(worker.to_worker, worker.outbox + b'{"op": "exit"}\n')
            except OSError:  # full or broken pipe: the kill below handles it
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            self._close_fds(worker)
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the real contract
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def wait_ready(self) -> None:
        """Block until every worker (replacements included) has warmed up."""
        self._wait_all_ready()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    # ------------------------------------------------------------------ in-process scoring
    def _score_inline(self, spec: RewardSpec, text: str, gt: str) -> dict[str, float]:
        try:
            return spec(text, gt)
        except Exception as exc:  # noqa: BLE001 - a bad reward must not kill training
            self.stats["errors"] += 1
            self.stats["last_error"] = repr(exc)
            return spec.zero()

    # ------------------------------------------------------------------ worker processes
    def _spawn(self) -> _Worker:
        req_read, req_write = os.pipe()
        rep_read, rep_write = os.pipe()
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        # the worker must import what the parent can (rlengine, modules of user rewards)
        env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path)
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlengine.rewards._worker", str(req_read), str(rep_write)],
            pass_fds=(req_read, rep_write), env=env, stdin=subprocess.DEVNULL, close_fds=True)
        os.close(req_read)
        os.close(rep_write)
        os.set_blocking(rep_read, False)
        os.set_blocking(req_write, False)  # a full request pipe must never block the timeout clock
        return _Worker(proc=proc, to_worker=req_write, from_worker=rep_read, started=time.monotonic())

    @staticmethod
    def _close_fds(worker: _Worker) -> None:
        for fd in (worker.to_worker, worker.from_worker):
            try:
                os.close(fd)
            except OSError:
                pass

    def _replace(self, worker: _Worker) -> None:
        """Kill `worker` and start a replacement in its slot (it warms up in the background)."""
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.wait()
        self._close_fds(worker)
        if not worker.ready:
            self._failed_starts += 1
            if self._failed_starts >= _MAX_FAILED_STARTS:
                raise RuntimeError(f"reward workers keep dying before they are ready (exit code "
                                   f"{worker.proc.returncode}); see stderr above")
        self.stats["restarts"] += 1
        self._workers[self._workers.index(worker)] = self._spawn()

    def _read_messages(self, worker: _Worker) -> tuple[list[dict], bool]:
        """Messages available from `worker` and whether its pipe reached EOF (the process died)."""
        eof = False
        while True:
            try:
                chunk = os.read(worker.from_worker, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            worker.buffer += chunk
        *lines, worker.buffer = worker.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()], eof

    def _wait_any_ready(self) -> None:
        self._wait_all_ready(any_ready=True)

    def _wait_all_ready(self, any_ready: bool = False) -> None:
        while True:
            waiting = [w for w in self._workers if not w.ready]
            if not waiting or (any_ready and len(waiting) < len(self._workers)):
                return
            now = time.monotonic()
            for worker in waiting:
                if now - worker.started > _READY_TIMEOUT_S:
                    self.close()
                    raise RuntimeError(f"a reward worker did not start within {_READY_TIMEOUT_S:.0f} s")
            readable, _, _ = select.select([w.from_worker for w in waiting], [], [], 1.0)
            for worker in waiting:
                if worker.from_worker in readable:
                    self._handle_replies(worker, None)

    def _handle_replies(self, worker: _Worker, batch: _Batch | None) -> None:
        """Consume a worker's replies; on EOF charge its current item as a crash and replace it."""
        messages, eof = self._read_messages(worker)
        for message in messages:
            op = message.get("op")
            if op == "ready":
                worker.ready = True
                self._failed_starts = 0
                continue
            item_id = message["id"]
            if not worker.pending or worker.pending[0] != item_id:
                continue  # a stale reply (cannot happen with in-order workers; ignore defensively)
            worker.pending.popleft()
            worker.item_started = time.monotonic()
            if op == "result":
                batch.set(item_id, {k: float(v) for k, v in message["score"].items()})
            else:
                self.stats["errors"] += 1
                self.stats["last_error"] = str(message.get("msg", ""))[-500:]
                batch.set(item_id, batch.spec.zero())
        if eof:
            if worker.pending:
                item_id = worker.pending.popleft()
                batch.set(item_id, batch.spec.zero())
                self.stats["errors"] += 1
                self.stats["crashes"] += 1
                self.stats["last_error"] = (f"reward worker died (exit code {worker.proc.wait()}) "
                                            f"on item {item_id}")
                batch.queue.extendleft(reversed(worker.pending))
                worker.pending.clear()
                worker.outbox = b""
            self._replace(worker)

    def _flush(self, worker: _Worker, batch: _Batch) -> None:
        """Write what the request pipe accepts now; a broken pipe means the worker died (its
        replies, read next, decide which item is charged)."""
        try:
            while worker.outbox:
                written = os.write(worker.to_worker, worker.outbox)
                worker.outbox = worker.outbox[written:]
        except BlockingIOError:
            pass
        except OSError:
            worker.outbox = b""
            self._handle_replies(worker, batch)  # reads to EOF, charges the running item, replaces

    def _score_in_workers(self, spec: RewardSpec, items: list[tuple[int, str, str]]) -> list[dict[str, float]]:
        batch = _Batch(spec=spec, results=[None] * len(items), queue=deque(i for i, _, _ in items))
        queue = batch.queue
        self._wait_any_ready()  # a batch's clock starts once a worker can take it
        batch_deadline = (time.monotonic() + self.batch_timeout_s) if self.batch_timeout_s else math.inf
        while batch.done < len(items):
            # 1. hand out chunks: a worker holds at most its current chunk plus one queued behind
            #    it, so it never waits for the parent between chunks
            for worker in list(self._workers):
                size = max(1, min(self.chunk_size, math.ceil(len(queue) / (2 * self.num_workers))))
                if worker.ready and queue and len(worker.pending) < size:
                    chunk = [queue.popleft() for _ in range(min(size, len(queue)))]
                    payload = {"op": "score", "ref": spec.ref, "items": [items[i] for i in chunk]}
                    if not worker.pending:
                        worker.item_started = time.monotonic()
                    worker.pending.extend(chunk)
                    worker.outbox += (json.dumps(payload) + "\n").encode()
                    self._flush(worker, batch)
            # 2. wait for replies, at most until the earliest item deadline
            now = time.monotonic()
            deadlines = [w.item_started + self.timeout_s for w in self._workers if w.pending]
            deadlines += [w.started + _READY_TIMEOUT_S for w in self._workers if not w.ready]
            wait = max(0.0, min(deadlines + [batch_deadline]) - now)
            readable, writable, _ = select.select([w.from_worker for w in self._workers],
                                                  [w.to_worker for w in self._workers if w.outbox], [],
                                                  min(wait, 1.0))
            for worker in list(self._workers):
                if worker.to_worker in writable and worker in self._workers:
                    self._flush(worker, batch)
            for worker in list(self._workers):
                if worker.from_worker in readable:
                    self._handle_replies(worker, batch)
            if readable and all(len(w.pending) > 1 for w in self._workers if w.ready):
                # every worker has queued work: let replies accumulate instead of waking per item
                # (on 2 cores the parent's wake-ups are CPU taken from the workers)
                time.sleep(_COALESCE_S)
            # 3. hard per-item timeout: score 0, kill, replace, requeue the rest of the chunk
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.pending and now - worker.item_started > self.timeout_s:
                    batch.set(worker.pending.popleft(), spec.zero())
                    self.stats["timeouts"] += 1
                    queue.extendleft(reversed(worker.pending))
                    worker.pending.clear()
                    worker.outbox = b""
                    self._replace(worker)
                elif not worker.ready and now - worker.started > _READY_TIMEOUT_S:
                    self._replace(worker)
            # 4. whole-batch deadline: everything unscored scores 0
            if now > batch_deadline and batch.done < len(items):
                for worker in list(self._workers):
                    if worker.pending:
                        worker.pending.clear()
                        worker.outbox = b""
                        self._replace(worker)
                for i, value in enumerate(batch.results):
                    if value is None:
                        batch.set(i, spec.zero())
                        self.stats["timeouts"] += 1
                queue.clear()
        return batch.results  # type: ignore[return-value]

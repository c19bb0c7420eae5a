"""RewardPool with real worker processes and the real math-verify: timeouts, crashes, errors."""
import time

import pytest

from rlengine.rewards import RewardPool, get_reward

H = "tests.test_rewards_helpers"
PATHOLOGICAL = "<think>x</think><answer>9^{9^{9^{9}}}</answer>"   # math-verify spins 5 s on it


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=1.5) as p:
        yield p


def _batch(n):
    texts, truths = [], []
    for i in range(n):
        right = i % 3 != 0
        texts.append(f"<think>count</think><answer>{i * 7 if right else i * 7 + 1}</answer>")
        truths.append(str(i * 7))
    return texts, truths


def test_pool_matches_in_process_scores(pool):
    texts, truths = _batch(30)
    texts[4] = r"<think>a</think> <answer>\frac{1}{2}</answer>"
    truths[4] = "0.5"
    texts[5] = "just words"
    spec = get_reward("answer_format")
    expected = [spec(t, g) for t, g in zip(texts, truths)]
    assert pool.score_detailed(texts, truths, reward="answer_format") == expected
    assert pool.score(texts, truths, reward="answer_format") == [e["reward"] for e in expected]
    assert pool.score(texts, truths, reward="answer") == [e["answer"] for e in expected]
    assert pool.score([], [], reward="answer") == []


def test_pathological_item_times_out_without_stalling_the_batch(pool):
    texts, truths = _batch(24)
    texts[5] = PATHOLOGICAL
    truths[5] = "5"
    before = dict(pool.stats)
    pids_before = set(pool.worker_pids)
    start = time.monotonic()
    scored = pool.score_detailed(texts, truths, reward="answer_format")
    elapsed = time.monotonic() - start
    assert scored[5] == {"reward": 0.0, "answer": 0.0, "format": 0.0}   # zero as a whole (format would be 1)
    spec = get_reward("answer_format")
    for i, (t, g) in enumerate(zip(texts, truths)):
        if i != 5:
            assert scored[i] == spec(t, g)
    assert pool.stats["timeouts"] == before["timeouts"] + 1
    assert pool.stats["restarts"] == before["restarts"] + 1
    assert 1.5 <= elapsed < 4.0                  # bounded by the pool's 1.5 s, not math-verify's 5 s
    killed = pids_before - set(pool.worker_pids)
    assert len(killed) == 1 and not _alive(killed.pop())
    # the replacement works: a normal batch afterwards is scored normally and quickly
    start = time.monotonic()
    assert pool.score(["<answer>3</answer>"] * 4, ["3"] * 4, reward="answer") == [1.0] * 4
    assert time.monotonic() - start < 1.5


def test_two_hangs_in_one_batch_run_in_parallel(pool):
    texts = ["SLEEP 30", "a", "b", "SLEEP 30", "c", "d", "e", "f"]
    before = pool.stats["timeouts"]
    start = time.monotonic()
    scores = pool.score(texts, [""] * len(texts), reward=f"{H}:sleep_on_marker")
    elapsed = time.monotonic() - start
    assert scores == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert pool.stats["timeouts"] == before + 2
    assert elapsed < 5.0                          # two workers: both hangs overlap (not 30 s, not 2x3 s)


def test_crashing_worker_is_replaced(pool):
    texts = ["ok"] * 5 + ["CRASH"] + ["ok"] * 6
    before = dict(pool.stats)
    scores = pool.score(texts, [""] * len(texts), reward=f"{H}:crash_on_marker")
    assert scores == [1.0] * 5 + [0.0] + [1.0] * 6
    assert pool.stats["crashes"] == before["crashes"] + 1
    assert pool.stats["errors"] == before["errors"] + 1
    assert pool.stats["restarts"] == before["restarts"] + 1
    assert "died" in pool.stats["last_error"]
    assert pool.score(["ok"] * 3, [""] * 3, reward=f"{H}:crash_on_marker") == [1.0] * 3


def test_raising_reward_scores_zero_and_counts(pool):
    before = dict(pool.stats)
    scores = pool.score(["x", "RAISE", "y"], ["", "", ""], reward=f"{H}:raise_on_marker")
    assert scores == [1.0, 0.0, 1.0]
    assert pool.stats["errors"] == before["errors"] + 1
    assert pool.stats["restarts"] == before["restarts"]            # an exception does not cost a worker
    assert "blew up" in pool.stats["last_error"]


def test_workers_are_light(pool):
    n = 6
    assert pool.score(["t"] * n, [""] * n, reward=f"{H}:torch_imported") == [0.0] * n
    assert pool.score(["t"] * n, [""] * n, reward=f"{H}:worker_threads") == [1.0] * n
    pool.wait_ready()                              # a replacement from an earlier test may still warm up
    pids = set(pool.score(["t"] * 40, [""] * 40, reward=f"{H}:worker_pid"))
    assert pids <= {float(p) for p in pool.worker_pids} and len(pids) == 2   # both workers used


def test_decorated_user_reward_in_workers(pool):
    scored = pool.score_detailed(["LOUD", "quiet"], ["", ""], reward=f"{H}:shouting")
    assert scored == [{"reward": 1.0, "loud": 1.0}, {"reward": 0.0, "loud": 0.0}]


def test_first_batch_not_charged_for_startup():
    start = time.monotonic()
    with RewardPool(num_workers=2, timeout_s=5.0) as p:
        built = time.monotonic() - start
        start = time.monotonic()
        assert p.score([r"<answer>\frac{3}{4}</answer>"], ["0.75"], reward="answer") == [1.0]
        first = time.monotonic() - start
        pids = p.worker_pids
    assert first < 0.5, (built, first)            # imports happened in the constructor
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)   # close() stopped the workers


def test_batch_timeout_bounds_the_whole_batch():
    with RewardPool(num_workers=1, timeout_s=20.0, batch_timeout_s=1.0) as p:
        start = time.monotonic()
        scores = p.score(["a", "SLEEP 30", "b"], ["", "", ""], reward=f"{H}:sleep_on_marker")
        assert time.monotonic() - start < 3.0
        assert scores == [1.0, 0.0, 0.0]
        assert p.stats["timeouts"] == 2
        assert p.score(["c"], [""], reward=f"{H}:sleep_on_marker") == [1.0]


def test_inline_pool_and_argument_errors():
    with RewardPool(num_workers=0, timeout_s=5.0) as p:
        assert p.score(["<answer>2</answer>", "RAISE"], ["2", ""], reward="answer") == [1.0, 0.0]
        assert p.score(["RAISE"], [""], reward=f"{H}:raise_on_marker") == [0.0]
        assert p.stats["errors"] == 1
        with pytest.raises(ValueError, match="ground truths"):
            p.score(["a"], [], reward="answer")
        with pytest.raises(ValueError, match="valid"):
            p.score(["a"], ["b"], reward="nope")
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["a"], ["b"])


def test_long_completions_pass_through_the_pipes(pool):
    # 6 x 300 kB of text is far more than a pipe holds: requests must stream without deadlock
    filler = "<think>" + "thinking " * 33_000 + "</think>"
    texts = [f"{filler}<answer>{i}</answer>" for i in range(6)]
    assert pool.score(texts, [str(i) for i in range(6)], reward="answer_format") == [2.0] * 6

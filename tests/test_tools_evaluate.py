"""tools/evaluate.py: Pass@k / Avg@k reporting, the resumable cache, checkpoint input.

On the session's real short training run (tests/real_runs.py): its final/ model with the run's
settings, and its last ZeRO-3 checkpoint, exported on the way, which must generate what final/
generates. The cache / resume / greedy mechanics run on a tiny random Llama with a word-level
tokenizer (fast enough to evaluate several times). Generation is real (HF `generate` through
rlengine.rollout), scoring goes through the real RewardPool and math-verify. Expected metric
values are computed here with exact binomials (math.comb), independently of rlengine.metrics.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import evaluate as EV  # noqa: E402
from tests.test_tools_export import make_tiny_base, zero3_run  # noqa: E402,F401  (fixture)


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


EPS64 = sys.float_info.epsilon                     # torch.finfo(torch.float64).eps


def mean_abs(problems: int, c_max: int) -> float:
    """|tool - reference| for a float64 mean over problems of per-problem pass@k / shares <= 1:
    pass_at_k's c_max factors leave <= (c_max + 1) eps64 (tests/test_metrics.py), the reference
    ratio of binomials one rounding, and each mean's sum and division problems + 1 more; x2 for
    the two sides."""
    return 2 * (c_max + 1 + problems + 1) * EPS64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_base(tmp_path_factory.mktemp("eval") / "tiny")


def test_ks_and_summary_match_exact_binomials():
    assert EV.ks_for(8) == [1, 2, 4, 8] and EV.ks_for(6) == [1, 2, 4, 6] and EV.ks_for(1) == [1]
    scores = [[1, 0, 0, 1, 0, 0], [0] * 6, [1] * 6, [1, 0, 0, 0, 0, 0]]
    lengths = [[10] * 6, [20] * 6, [30] * 6, [40] * 6]
    cut = [[False] * 6, [True] * 6, [False] * 6, [False] * 6]
    s = EV.summarize(scores, lengths, cut)
    counts = [2, 0, 6, 1]
    tol = mean_abs(len(counts), max(counts))
    assert s["avg@6"] == pytest.approx(sum(c / 6 for c in counts) / 4, abs=tol)
    for k in (1, 2, 4, 6):
        assert s[f"pass@{k}"] == pytest.approx(sum(exact_pass_at_k(6, c, k) for c in counts) / 4, abs=tol)
    assert s["pass@1"] == pytest.approx(s["avg@6"], abs=tol)
    assert s["mean_response_tokens"] == 25 and s["truncated_frac"] == 0.25


def test_data_specs():
    d = EV.parse_data_spec("arithmetic")
    assert (d.name, d.preset, d.path, d.split) == ("arithmetic", "arithmetic", None, "test")
    d = EV.parse_data_spec("m500:math=/data/math500.jsonl@test")
    assert (d.name, d.preset, d.path, d.split) == ("m500", "math", "/data/math500.jsonl", "test")
    with pytest.raises(EV.EvalError, match="unknown preset"):
        EV.parse_data_spec("nope")
    with pytest.raises(EV.EvalError, match="needs a path"):
        EV.parse_data_spec("gsm8k")


def _custom_dataset(tmp_path: Path) -> str:
    rows = [{"question": f"What is {a} + {b} ?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (2, 2), (7, 1)]]
    path = tmp_path / "tiny_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"tiny:arithmetic={path}"


def test_evaluate_resumes_exactly_and_scores_with_math_verify(tiny_model, tmp_path):
    from rlengine.rewards import math_reward

    spec = [EV.parse_data_spec(_custom_dataset(tmp_path))]
    kw = dict(n=3, temperature=1.0, max_new_tokens=6, backend="hf", chunk_problems=2, reward_workers=0,
              progress=False, seed=5)
    full = EV.evaluate(str(tiny_model), spec, cache_dir=str(tmp_path / "full"), **kw)
    with pytest.raises(KeyboardInterrupt):  # killed after the first chunk of 2 problems
        EV.evaluate(str(tiny_model), spec, cache_dir=str(tmp_path / "resumed"), stop_after_chunks=1, **kw)
    partial = (tmp_path / "resumed" / "generations.jsonl").read_text().splitlines()
    assert len(partial) == 2
    resumed = EV.evaluate(str(tiny_model), spec, cache_dir=str(tmp_path / "resumed"), **kw)
    a = [json.loads(x) for x in (tmp_path / "full" / "generations.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "resumed" / "generations.jsonl").read_text().splitlines()]
    key = lambda r: (r["dataset"], r["index"])  # noqa: E731
    assert sorted(a, key=key) == sorted(b, key=key)      # resuming sampled what one run sampled
    assert resumed["results"] == full["results"]
    assert len(a) == 5 and all(len(r["texts"]) == 3 for r in a)
    for r in a:  # cached scores are the reward of the cached text
        assert r["scores"] == [math_reward(t, r["answer"], extract="answer") for t in r["texts"]]
        assert all(0 < n <= 6 for n in r["lengths"])
    res = full["results"]["tiny"]
    assert res["problems"] == 5 and res["samples"] == 3 and set(res) >= {"avg@3", "pass@1", "pass@2", "pass@3"}
    # a cache made with other settings is refused rather than mixed
    with pytest.raises(EV.EvalError, match="other settings"):
        EV.evaluate(str(tiny_model), spec, cache_dir=str(tmp_path / "full"), **{**kw, "n": 2})


def test_greedy_is_one_deterministic_sample(tiny_model, tmp_path):
    spec = [EV.parse_data_spec(_custom_dataset(tmp_path))]
    kw = dict(greedy=True, max_new_tokens=5, backend="hf", reward_workers=0, progress=False, limit=3)
    r1 = EV.evaluate(str(tiny_model), spec, cache_dir=str(tmp_path / "g1"), seed=1, **kw)
    r2 = EV.evaluate(str(tiny_model), spec, cache_dir=str(tmp_path / "g2"), seed=2, **kw)
    assert r1["settings"]["n"] == 1 and r1["results"]["tiny"]["problems"] == 3
    t1 = [json.loads(x)["texts"] for x in (tmp_path / "g1" / "generations.jsonl").read_text().splitlines()]
    t2 = [json.loads(x)["texts"] for x in (tmp_path / "g2" / "generations.jsonl").read_text().splitlines()]
    assert t1 == t2 and all(len(t) == 1 for t in t1)


def test_cli_table_and_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = EV.main([str(tiny_model), "--data", _custom_dataset(tmp_path), "--data", "arithmetic", "--limit", "2",
                  "-n", "2", "--max-new-tokens", "4", "--backend", "hf", "--reward-workers", "0", "--no-progress",
                  "--cache", str(tmp_path / "c"), "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pass@2" in text and "tiny" in text and "arithmetic" in text and "overall" in text
    report = json.loads(out.read_text())
    assert report["results"]["overall"]["problems"] == 4
    assert json.loads(text.strip().splitlines()[-1]) == report["results"]
    assert EV.main([str(tmp_path / "nothing"), "--no-progress"]) == 2


def test_checkpoint_input_is_exported_once(zero3_run, tmp_path):
    ckpt = zero3_run / "checkpoints" / "step_000002"
    model_path, run = EV.resolve_model(str(ckpt), export_dir=str(tmp_path / "exported"))
    assert Path(model_path) == tmp_path / "exported" and run == ckpt
    assert (tmp_path / "exported" / "rlengine_export.json").is_file()
    stamp = (tmp_path / "exported" / "rlengine_export.json").stat().st_mtime_ns
    EV.resolve_model(str(ckpt), export_dir=str(tmp_path / "exported"))       # reused, not redone
    assert (tmp_path / "exported" / "rlengine_export.json").stat().st_mtime_ns == stamp
    assert EV.run_defaults(ckpt) == {}  # its config.yaml has no data / rollout section


# ----------------------------------------------------------------------------- a real run

DIGIT = "tests.rewards_for_tests:has_digit"


def _cached(cache: Path) -> list[dict]:
    records = [json.loads(x) for x in (cache / "generations.jsonl").read_text().splitlines()]
    return sorted(records, key=lambda r: r["index"])


def test_cli_on_a_real_run(run_dir, tmp_path, capsys):
    """A run directory: its final/ model, its system prompt and rollout.max_new_tokens; every number
    reported follows from the per-sample scores written to the cache."""
    import yaml

    from tests.rewards_for_tests import has_digit

    out, cache = tmp_path / "res.json", tmp_path / "cache"
    rc = EV.main([str(run_dir), "--limit", "4", "-n", "4", "--reward", DIGIT, "--backend", "hf",
                  "--reward-workers", "0", "--no-progress", "--cache", str(cache), "--out", str(out)])
    assert rc == 0
    assert "arithmetic" in capsys.readouterr().out
    report = json.loads(out.read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert report["model"] == str(run_dir / "final") and report["backend"] == "hf"
    assert report["settings"]["max_new_tokens"] == cfg["rollout"]["max_new_tokens"]
    assert report["settings"]["system_prompt"] == cfg["data"]["system_prompt"]
    records = _cached(cache)
    assert [r["index"] for r in records] == [0, 1, 2, 3] and all(len(r["texts"]) == 4 for r in records)
    for r in records:
        assert r["scores"] == [has_digit(t, r["answer"]) for t in r["texts"]]
        assert all(0 < n <= cfg["rollout"]["max_new_tokens"] for n in r["lengths"])
    correct = [sum(s >= 1 for s in r["scores"]) for r in records]
    res = report["results"]["arithmetic"]
    assert res["problems"] == 4 and report["results"]["overall"] == res
    tol = mean_abs(len(correct), max(correct))
    assert res["pass@1"] == pytest.approx(sum(correct) / 16, abs=tol)        # the mean per-sample correctness
    assert res["avg@4"] == pytest.approx(sum(correct) / 16, abs=tol)
    for k in (2, 4):
        assert res[f"pass@{k}"] == pytest.approx(sum(exact_pass_at_k(4, c, k) for c in correct) / 4, abs=tol)
    lengths = [n for r in records for n in r["lengths"]]
    # means of 16 integers (exact sums): one division each side, <= 16 more roundings in the tool's mean
    assert res["mean_response_tokens"] == pytest.approx(sum(lengths) / 16, rel=2 * 17 * EPS64)
    assert res["truncated_frac"] == pytest.approx(sum(f == "length" for r in records for f in r["finish"]) / 16,
                                                  abs=2 * 17 * EPS64)


def test_real_checkpoint_generates_what_final_generates(run_dir, tmp_path):
    """The last checkpoint (step 3) is exported once, verified, and greedily generates exactly the
    texts of final/, the model the trainer saved after the same step."""
    ckpt = run_dir / "checkpoints" / "step_000003"
    kw = dict(greedy=True, limit=3, max_new_tokens=12, reward=DIGIT, backend="hf", reward_workers=0, progress=False)
    from_ckpt = EV.evaluate(str(ckpt), [], cache_dir=str(tmp_path / "c1"), export_dir=str(tmp_path / "hf"), **kw)
    from_final = EV.evaluate(str(run_dir / "final"), [], cache_dir=str(tmp_path / "c2"), **kw)
    assert from_ckpt["model"] == str(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "rlengine_export.json").read_text())["state"]["step"] == 3
    a, b = _cached(tmp_path / "c1"), _cached(tmp_path / "c2")
    assert [r["texts"] for r in a] == [r["texts"] for r in b] and len(a) == 3
    assert from_ckpt["results"] == from_final["results"]

"""Prompt data: every preset from a fixture in its dataset's real schema, bad rows by number,
chat templating with the real SmolLM2 tokenizer, length filtering, seeded resumable streams,
mixtures, and the bundled arithmetic set."""
import json
import math
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlengine.data import (DATA_DIR, FEW_SHOT, PRESETS, SYSTEM_PROMPTS, DataError, apply_chat_template,
                           build_prompt_stream, encode_prompts, load_examples)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Src:  # DataSource-like (the real one lives in rlengine.config; data.py reads attributes only)
    preset: str = "arithmetic"
    path: str | None = None
    subset: str | None = None
    split: str = "train"
    weight: float = 1.0
    prompt_field: str | None = None
    answer_field: str | None = None


@dataclass
class Cfg(Src):  # DataConfig-like
    mixture: list = field(default_factory=list)
    system_prompt: str = "think_answer"
    max_prompt_tokens: int = 512
    skip_bad_rows: bool = False
    shuffle: bool = True
    seed: int = 42


@pytest.fixture(scope="session")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------ presets in their real schemas
GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                 "in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A shop sells 1200 pens a day for 2 days. How many pens?",
     "answer": "1200*2 = <<1200*2=2400>>2400\n#### 2,400"},
]
MATH_ROWS = [  # hendrycks MATH: the answer is the last \boxed{} of the solution
    {"problem": "What is $\\frac{1}{4}+\\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "We add: $\\frac{1}{4}+\\frac{1}{4}=\\frac{2}{4}=\\boxed{\\frac{1}{2}}$."},
]
MATH500_ROWS = [  # HuggingFaceH4/MATH-500: an explicit answer field
    {"problem": "Convert $(0,3)$ to polar coordinates.", "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
]
DEEPMATH_ROWS = [
    {"question": "Evaluate $\\lim_{x\\to 0} \\frac{\\sin x}{x}$.", "final_answer": "1", "difficulty": 4.0,
     "topic": "Mathematics -> Calculus", "r1_solution_1": "...", "r1_solution_2": "...", "r1_solution_3": "..."},
]
DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response should be of "
               "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
               "How many positive divisors does 12 have?\n\nRemember to put your answer on its own line "
               "after \"Answer:\".")
DAPO_ROWS = [
    {"data_source": "math_dapo", "prompt": [{"content": DAPO_PROMPT, "role": "user"}], "ability": "MATH",
     "reward_model": {"ground_truth": "6", "style": "rule-lighteval/MATH_v2"},
     "extra_info": {"index": "9a9b6eb4-a1cb-49d1-8c1e-62eaf2f74079"}},
]
AIME_ROWS = [  # AI-MO/aimo-validation-aime
    {"id": 60, "problem": "Find the remainder when 2024 is divided by 1000.", "solution": "...",
     "answer": "24", "url": "https://artofproblemsolving.com/wiki/"},
]
AIME24_ROWS = [  # Maxwell-Jia/AIME_2024: capitalised fields, integer answers
    {"ID": "2024-I-1", "Problem": "Compute 2+2.", "Solution": "...", "Answer": 4},
]


@pytest.mark.parametrize("preset, rows, expected", [
    ("gsm8k", GSM8K_ROWS, [(GSM8K_ROWS[0]["question"], "72"), (GSM8K_ROWS[1]["question"], "2400")]),
    ("math", MATH_ROWS, [(MATH_ROWS[0]["problem"], "\\frac{1}{2}")]),
    ("math", MATH500_ROWS, [(MATH500_ROWS[0]["problem"], "\\left( 3, \\frac{\\pi}{2} \\right)")]),
    ("deepmath", DEEPMATH_ROWS, [(DEEPMATH_ROWS[0]["question"], "1")]),
    ("dapo", DAPO_ROWS, [(DAPO_PROMPT, "6")]),
    ("aime", AIME_ROWS, [(AIME_ROWS[0]["problem"], "24")]),
    ("aime", AIME24_ROWS, [("Compute 2+2.", "4")]),
])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_presets_read_real_schemas(tmp_path, preset, rows, expected, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "data.jsonl", rows)
    else:
        path = str(tmp_path / "data.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    examples = load_examples(Src(preset=preset, path=path))
    assert [(e.question, e.answer) for e in examples] == expected
    assert [e.row for e in examples] == list(range(1, len(rows) + 1))
    assert all(e.source == preset for e in examples)
    if preset == "dapo":
        assert examples[0].messages == [{"role": "user", "content": DAPO_PROMPT}]


def test_custom_mapping_with_nested_field(tmp_path):
    rows = [{"q": "What is 3*3?", "meta": {"gt": 9}}, {"q": "What is 1+1?", "meta": {"gt": "2"}}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    got = load_examples(Src(preset="custom", path=path, prompt_field="q", answer_field="meta.gt"))
    assert [(e.question, e.answer) for e in got] == [("What is 3*3?", "9"), ("What is 1+1?", "2")]
    with pytest.raises(DataError, match="prompt_field"):
        load_examples(Src(preset="custom", path=path))
    with pytest.raises(DataError, match="valid"):
        load_examples(Src(preset="gsm8kk", path=path))
    assert {"arithmetic", "gsm8k", "math", "deepmath", "dapo", "aime", "custom"} <= set(PRESETS)


def test_datasets_directory_and_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(GSM8K_ROWS), "test": Dataset.from_list(GSM8K_ROWS[:1])}) \
        .save_to_disk(str(tmp_path / "gsm"))
    assert [e.answer for e in load_examples(Src(preset="gsm8k", path=str(tmp_path / "gsm")))] == ["72", "2400"]
    assert [e.answer for e in load_examples(Src(preset="gsm8k", path=str(tmp_path / "gsm"), split="test"))] == ["72"]
    with pytest.raises(DataError, match="no split"):
        load_examples(Src(preset="gsm8k", path=str(tmp_path / "gsm"), split="validation"))
    # a plain directory of files: the one whose name holds the split is read
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.Table.from_pylist(DAPO_ROWS), tmp_path / "hub" / "train-00000-of-00001.parquet")
    assert [e.answer for e in load_examples(Src(preset="dapo", path=str(tmp_path / "hub")))] == ["6"]


def test_hub_snapshot_subset_picks_the_configuration_folder(tmp_path):
    # a local copy of openai/gsm8k keeps one folder per configuration: main/ and socratic/
    for subset, rows in (("main", GSM8K_ROWS), ("socratic", GSM8K_ROWS[:1])):
        (tmp_path / "gsm8k" / subset).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm8k" / subset / "train-00000-of-00001.parquet")
    path = str(tmp_path / "gsm8k")
    assert [e.answer for e in load_examples(Src(preset="gsm8k", path=path, subset="main"))] == ["72", "2400"]
    assert [e.answer for e in load_examples(Src(preset="gsm8k", path=path, subset="socratic"))] == ["72"]
    assert len(load_examples(Src(preset="gsm8k", path=path))) == 3  # no subset: every train file
    with pytest.raises(DataError, match="under a folder 'mian'"):
        load_examples(Src(preset="gsm8k", path=path, subset="mian"))


def test_subset_is_a_config_key():
    from rlengine.config import load_config

    cfg = load_config(None, ["data.subset=main"])
    assert cfg.data.subset == "main"


# ------------------------------------------------------------------ bad rows
BAD_ROWS = [
    {"question": "ok 1", "answer": "1"},                  # row 1
    "",                                                    # line 2: blank, skipped silently
    {"question": "ok 3", "answer": 3},                    # row 3: an integer answer is fine
    {"question": "no answer"},                            # row 4: missing field
    {"question": "ok 5", "answer": "5"},                  # row 5
    {"question": "list answer", "answer": [1, 2]},        # row 6: wrong type
    {"question": "empty answer", "answer": "  "},         # row 7: empty
    '{"question": "broken json", ',                       # row 8: invalid JSON
    {"question": 12, "answer": "1"},                      # row 9: wrong prompt type
    {"question": "ok 10", "answer": "10"},                # row 10
]


def test_bad_rows_are_named_by_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError) as err:
        load_examples(Src(preset="arithmetic", path=path))
    message = str(err.value)
    assert "bad.jsonl" in message and "row 4" in message and "answer" in message
    for row_no, needle in [(6, "string or a number"), (7, "empty answer"), (8, "invalid JSON"), (9, "prompt")]:
        rows = [r for i, r in enumerate(BAD_ROWS, start=1) if i in (1, row_no)]
        p = write_jsonl(tmp_path / f"bad{row_no}.jsonl", rows)
        with pytest.raises(DataError, match=f"bad{row_no}.jsonl: row 2: .*{needle}"):
            load_examples(Src(path=p))


def test_skip_bad_rows_counts_them(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    stats = {}
    got = load_examples(Src(path=path), skip_bad_rows=True, stats=stats)
    assert [(e.row, e.answer) for e in got] == [(1, "1"), (3, "3"), (5, "5"), (10, "10")]
    assert stats["bad_rows"] == 5
    stream = build_prompt_stream(Cfg(path=path, skip_bad_rows=True, shuffle=False), tokenizer)
    assert stream.stats["bad_rows"] == 5 and stream.stats["num_prompts"] == 4
    assert [p.row for p in stream.next_batch(4)] == [1, 3, 5, 10]


def test_gsm8k_without_answer_marker_is_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [GSM8K_ROWS[0], {"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match="row 2: .*####"):
        load_examples(Src(preset="gsm8k", path=path))


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(Src(path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="needs data.path"):
        load_examples(Src(preset="gsm8k"))
    with pytest.raises(DataError, match="split"):
        load_examples(Src(split="validation"))


# ------------------------------------------------------------------ templating and tokenising
def test_prompts_are_chat_templated_once(tokenizer):
    stream = build_prompt_stream(Cfg(split="test", shuffle=False), tokenizer)
    prompt = stream.next_batch(1)[0]
    first = load_examples(Src(split="test"))[0]
    assert (prompt.question, prompt.answer, prompt.row, prompt.source) == (first.question, first.answer, 1, "arithmetic")
    demos = "".join(f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
                    for u, a in FEW_SHOT["think_answer"])
    expected_text = ("<|im_start|>system\n" + SYSTEM_PROMPTS["think_answer"] + "<|im_end|>\n" + demos
                     + "<|im_start|>user\n" + first.question + "<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.prompt_text == expected_text
    assert prompt.prompt_ids == tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt.prompt_ids[0] == im_start and prompt.prompt_ids[1] != im_start
    assert prompt.prompt_ids.count(im_start) == 7                     # system, 2 demo pairs, user, assistant
    assert tokenizer.decode(prompt.prompt_ids) == expected_text


def test_double_bos_is_collapsed(tokenizer):
    bos = tokenizer.bos_token
    ids = encode_prompts(tokenizer, [bos + bos + "hi", bos + "hi"])
    assert ids[0] == ids[1] and ids[1][0] == tokenizer.bos_token_id and ids[1][1] != tokenizer.bos_token_id


@pytest.mark.parametrize("system, present, absent", [
    ("think_answer", "<think> </think>", "\\boxed"),
    ("boxed", "\\boxed{}", "<think>"),
    ("Answer tersely, pirate.", "Answer tersely, pirate.", "<think>"),
])
def test_system_prompts(tokenizer, system, present, absent):
    text = apply_chat_template(tokenizer, "What is 1+1?", system)
    assert present in text and absent not in text and "What is 1+1?" in text
    assert text.startswith("<|im_start|>system\n")


def test_think_answer_demonstrations_follow_the_reward(tokenizer):
    from rlengine.rewards import get_reward

    demos = FEW_SHOT["think_answer"]
    assert [get_reward("answer_format")(a, truth)["reward"] for (_, a), truth in zip(demos, ["5", "12"])] == [2.0, 2.0]
    with_demos = apply_chat_template(tokenizer, "What is 1+1?", "think_answer")
    plain = apply_chat_template(tokenizer, "What is 1+1?", "think_answer_plain")
    assert all(u in with_demos and a in with_demos for u, a in demos)
    assert not any(u in plain for u, _ in demos) and SYSTEM_PROMPTS["think_answer"] in plain


def test_no_system_prompt_and_dataset_chat(tokenizer):
    text = apply_chat_template(tokenizer, "What is 1+1?", "none")
    for prompt in SYSTEM_PROMPTS.values():
        assert prompt is None or prompt not in text
    chat = [{"role": "system", "content": "Dataset system."}, {"role": "user", "content": "Q?"}]
    text = apply_chat_template(tokenizer, chat, "think_answer")          # the dataset's own system wins
    assert "Dataset system." in text and SYSTEM_PROMPTS["think_answer"] not in text
    assert FEW_SHOT["think_answer"][0][0] not in text                  # no demos under a foreign system


def test_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
    rows = [{"question": "word " * n, "answer": str(n)} for n in (5, 300, 10, 600, 20)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    lengths = [len(tokenizer(apply_chat_template(tokenizer, r["question"], "boxed"), add_special_tokens=False)
                   ["input_ids"]) for r in rows]
    limit = sorted(lengths)[2]                                          # keeps exactly the 3 shortest
    stream = build_prompt_stream(Cfg(path=path, system_prompt="boxed", max_prompt_tokens=limit, shuffle=False), tokenizer)
    assert stream.stats["dropped_too_long"] == 2 and stream.stats["num_prompts"] == 3
    assert sorted(p.answer for p in stream.next_batch(3)) == ["10", "20", "5"]
    assert all(len(p.prompt_ids) <= limit for p in stream.next_batch(6))
    with pytest.raises(DataError, match="longer than"):
        build_prompt_stream(Cfg(path=path, max_prompt_tokens=3), tokenizer)


# ------------------------------------------------------------------ streams: order, epochs, resume
@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    return write_jsonl(path, [{"question": f"q{i}", "answer": str(i)} for i in range(7)])


def _answers(prompts):
    return [p.answer for p in prompts]


def test_epochs_are_seeded_permutations(small_set, tokenizer):
    stream = build_prompt_stream(Cfg(path=small_set, seed=3), tokenizer)
    epochs = [_answers(stream.next_batch(7)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch, key=int) == [str(i) for i in range(7)]     # every prompt once per epoch
    assert len({tuple(e) for e in epochs}) == 3                         # a new order each epoch
    again = build_prompt_stream(Cfg(path=small_set, seed=3), tokenizer)
    assert [_answers(again.next_batch(7)) for _ in range(3)] == epochs  # same seed, same stream
    other = build_prompt_stream(Cfg(path=small_set, seed=4), tokenizer)
    assert [_answers(other.next_batch(7)) for _ in range(3)] != epochs
    plain = build_prompt_stream(Cfg(path=small_set, shuffle=False), tokenizer)
    assert _answers(plain.next_batch(10)) == [str(i) for i in range(7)] + ["0", "1", "2"]


@pytest.mark.parametrize("consumed", [0, 3, 7, 12, 20])
def test_state_restores_the_exact_position(small_set, tokenizer, consumed):
    stream = build_prompt_stream(Cfg(path=small_set, seed=11), tokenizer)
    stream.next_batch(consumed)
    state = json.loads(json.dumps(stream.state_dict()))                 # JSON round trip
    expected = _answers(stream.next_batch(16))
    fresh = build_prompt_stream(Cfg(path=small_set, seed=11), tokenizer)
    fresh.load_state_dict(state)
    assert _answers(fresh.next_batch(16)) == expected


def test_state_of_other_data_is_refused(small_set, tmp_path, tokenizer):
    state = build_prompt_stream(Cfg(path=small_set), tokenizer).state_dict()
    other = write_jsonl(tmp_path / "o.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match="changed"):
        build_prompt_stream(Cfg(path=other), tokenizer).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        build_prompt_stream(Cfg(path=small_set, seed=1), tokenizer).load_state_dict(state)


def test_mixture_weights_and_resume(tmp_path, tokenizer):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", GSM8K_ROWS * 5)
    deep = write_jsonl(tmp_path / "deep.jsonl", DEEPMATH_ROWS * 3)
    cfg = Cfg(mixture=[Src(preset="gsm8k", path=gsm, weight=3.0), Src(preset="deepmath", path=deep, weight=1.0)])
    stream = build_prompt_stream(cfg, tokenizer)
    assert stream.sources == ["gsm8k", "deepmath"] and stream.stats["num_prompts"] == 13
    counts = Counter(p.source for p in stream.next_batch(4000))
    # statistical: each draw picks gsm8k with p = 3/4 independently, so the share of n = 4000 draws
    # has standard error sqrt(p (1 - p) / n) = 0.0068; 4 standard errors (a fair draw lands outside
    # with probability 6e-5; the stream is seeded, so it is one fixed draw) still fail weights
    # misread by a little (3:1 as 2:1 is off by 0.08) and by a lot (as 1:1: 0.25)
    assert abs(counts["gsm8k"] / 4000 - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)
    state = stream.state_dict()
    expected = [(p.source, p.row) for p in stream.next_batch(50)]
    fresh = build_prompt_stream(cfg, tokenizer)
    fresh.load_state_dict(state)
    assert [(p.source, p.row) for p in fresh.next_batch(50)] == expected
    equal = build_prompt_stream(Cfg(mixture=[Src(preset="gsm8k", path=gsm), Src(preset="deepmath", path=deep)]),
                                tokenizer)                              # the gate paper's equal mix
    share = Counter(p.source for p in equal.next_batch(4000))["gsm8k"] / 4000
    assert abs(share - 0.5) < 4 * math.sqrt(0.5 * 0.5 / 4000)       # binomial, as above: 0.032
    with pytest.raises(DataError, match="positive"):
        build_prompt_stream(Cfg(mixture=[Src(preset="gsm8k", path=gsm, weight=0.0), Src(preset="deepmath", path=deep)]),
                            tokenizer)


# ------------------------------------------------------------------ the bundled dataset
def test_bundled_arithmetic_set():
    train, test = load_examples(Src(split="train")), load_examples(Src(split="test"))
    assert 2000 <= len(train) <= 5000 and 300 <= len(test) <= 1000
    assert not {e.question for e in train} & {e.question for e in test}
    for e in train + test:
        assert e.answer.isdigit() and int(e.answer) <= 200
    size = sum(p.stat().st_size for p in DATA_DIR.glob("arithmetic_*.jsonl"))
    assert size < 1_000_000


def test_bundled_set_is_reproduced_by_its_script(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "make_arithmetic.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["train"] == 3000
    for split in ("train", "test"):
        assert (tmp_path / f"arithmetic_{split}.jsonl").read_bytes() == \
            (DATA_DIR / f"arithmetic_{split}.jsonl").read_bytes()
    for line in (DATA_DIR / "arithmetic_train.jsonl").read_text().splitlines()[:300]:
        row = json.loads(line)
        assert _solve(row) == int(row["answer"]), row


def _solve(row) -> int:
    """An independent solver for the generator's templates (reads the numbers back from the text)."""
    import re

    q, t = row["question"], row["template"]
    n = [int(x) for x in re.findall(r"\d+", q)]
    return {"add": lambda: n[0] + n[1], "subtract": lambda: n[0] - n[1], "multiply": lambda: n[0] * n[1],
            "share": lambda: n[0] // n[1], "compare": lambda: n[0] + n[1],
            "add_then_subtract": lambda: n[0] + n[1] - n[2], "multiply_then_add": lambda: n[0] * n[1] + n[2],
            "two_people_total": lambda: 2 * n[0] + n[1], "price": lambda: n[2] - n[0] * n[1]}[t]()

"""Prompt datasets: reading, presets, chat templating, length filtering, resumable shuffled streams.

Sources are local JSONL / Parquet files, a directory saved by `datasets` (`save_to_disk`) or of
JSONL / Parquet files, a hub name for `datasets.load_dataset` (needs internet), or the bundled
arithmetic word problems (`path=None`, preset `arithmetic`, split `train` | `test`).

A preset maps a row of a known dataset schema to (question, ground-truth answer); see PRESETS.
`prompt_field` / `answer_field` override a preset's fields (dotted paths reach nested dicts:
`reward_model.ground_truth`); preset `custom` requires both. A malformed row (missing field, wrong
type, empty question or answer, invalid JSON) raises DataError naming the file and row (rows
count from 1; for JSONL the row is the line number), or with `skip_bad_rows` is skipped and counted.

`build_prompt_stream(cfg, tokenizer)` chat-templates every question with the configured system
prompt, drops (and counts) prompts longer than `max_prompt_tokens` and returns a PromptStream: an
infinite, epoch-wrapping, seeded stream (mixture sources are drawn by weight) whose exact
position `state_dict()` saves and `load_state_dict()` restores.

Config objects are read duck-typed (attributes only), so any object with DataConfig's fields works.
"""
from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rlengine.rewards.extract import extract_boxed

DATA_DIR = Path(__file__).resolve().parent / "data_files"
BUNDLED_SPLITS = ("train", "test")

_THINK_ANSWER = (
    "You are a helpful assistant. First think about the problem step by step inside "
    "<think> </think> tags, then write only the final answer inside <answer> </answer> tags, "
    "like this: <think> reasoning here </think> <answer> final answer here </answer>")

SYSTEM_PROMPTS: dict[str, str | None] = {
    # the gate paper's template: reasoning in <think>, final answer alone in <answer>
    # (with two worked demonstrations, see FEW_SHOT)
    "think_answer": _THINK_ANSWER,
    # the same instruction without demonstrations
    "think_answer_plain": _THINK_ANSWER,
    # DGPO / DeepSeek-R1 style: the final answer in \boxed{}
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
    # no system message (a chat template may still insert its own default)
    "none": None,
}

# Worked demonstrations (user, assistant) placed as chat turns after a named system prompt.
# SmolLM2-135M-Instruct ignores the bare <think>/<answer> instruction (0 of 96 samples followed it);
# with these two turns ~20% of its samples are well formed, so the format reward has a signal.
FEW_SHOT: dict[str, list[tuple[str, str]]] = {
    "think_answer": [
        ("Sam has 3 apples and buys 2 more. How many apples does Sam have now?",
         "<think> 3 + 2 = 5 </think> <answer> 5 </answer>"),
        ("Each bag holds 4 marbles. Mia has 3 bags. How many marbles does Mia have in total?",
         "<think> 3 * 4 = 12 </think> <answer> 12 </answer>"),
    ],
}


class DataError(ValueError):
    """A malformed dataset row or an unusable data source (the message names file and row)."""


# ---------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """How to read (question, answer) from a row of one dataset schema."""

    name: str
    prompt_fields: tuple[str, ...]          # the first one present in a row is used
    answer_fields: tuple[str, ...]
    answer_transform: Callable[[str, str], str] | None = None  # (field used, raw answer) -> ground truth
    doc: str = ""


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def _gsm8k_answer(field_name: str, raw: str) -> str:
    if "####" not in raw:
        raise ValueError("GSM8K answer has no '####' line")
    return raw.rsplit("####", 1)[1].strip().replace(",", "")


def _math_answer(field_name: str, raw: str) -> str:
    if field_name.split(".")[-1] == "answer":
        return raw
    boxed = extract_boxed(raw)  # a full solution: the answer is its last \boxed{}
    if boxed is None:
        raise ValueError(f"no \\boxed{{}} answer in field {field_name!r}")
    return boxed


register_preset(Preset("arithmetic", ("question",), ("answer",),
                       doc="bundled word problems: question, answer (integer string)"))
register_preset(Preset("gsm8k", ("question",), ("answer",), _gsm8k_answer,
                       doc="openai/gsm8k: question, answer (solution ending in '#### <number>')"))
register_preset(Preset("math", ("problem",), ("answer", "solution"), _math_answer,
                       doc="MATH / MATH500: problem, answer or solution (last \\boxed{})"))
register_preset(Preset("deepmath", ("question",), ("final_answer",),
                       doc="zwhe99/DeepMath-103K: question, final_answer"))
register_preset(Preset("dapo", ("prompt",), ("reward_model.ground_truth",),
                       doc="DAPO-Math-17k: prompt (chat list of {role, content}), reward_model.ground_truth"))
register_preset(Preset("aime", ("problem", "question", "Problem"), ("answer", "Answer"),
                       doc="AIME-style: problem (or question / Problem), answer (or Answer), string or integer"))
register_preset(Preset("custom", (), (), doc="data.prompt_field and data.answer_field name the fields"))


def resolve_preset(preset_name: str, prompt_field: str | None = None, answer_field: str | None = None) -> Preset:
    """The preset with any field overrides applied; errors name the valid presets."""
    if preset_name not in PRESETS:
        raise DataError(f"unknown data preset {preset_name!r}; valid: {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    if preset_name == "custom" and not (prompt_field and answer_field):
        raise DataError("preset 'custom' needs both data.prompt_field and data.answer_field")
    return Preset(preset.name,
                  (prompt_field,) if prompt_field else preset.prompt_fields,
                  (answer_field,) if answer_field else preset.answer_fields,
                  preset.answer_transform, preset.doc)


# ---------------------------------------------------------------------------------------- rows
@dataclass
class Example:
    """One problem: `question` is the user text; `messages` the chat list when the dataset gives one."""

    question: str
    answer: str
    source: str = ""
    row: int = 0                     # 1-based row (JSONL: line number)
    messages: list[dict] | None = None


def _lookup(row: dict, dotted: str) -> tuple[bool, Any]:
    if dotted in row:
        return True, row[dotted]
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _first_field(row: dict, fields: tuple[str, ...], what: str) -> tuple[str, Any]:
    for name in fields:
        found, value = _lookup(row, name)
        if found:
            return name, value
    raise ValueError(f"missing {what} field {' / '.join(repr(f) for f in fields)} "
                     f"(row has {sorted(row)[:12]})")


def _as_messages(value: Any) -> list[dict]:
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise ValueError(f"chat prompt must be a non-empty list of {{role, content}}, got {type(value).__name__}")
    messages = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("every chat message needs string 'role' and 'content'")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ValueError("chat prompt has no non-empty user message")
    return messages


def _as_answer(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"answer must be a string or a number, got {type(value).__name__}")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"answer is {value}")
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if not isinstance(value, str):
        raise ValueError(f"answer must be a string or a number, got {type(value).__name__}")
    return value


def row_to_example(row: Any, preset: Preset) -> Example:
    """(question, answer) of one row; ValueError says what is wrong (the caller adds file and row)."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    _, prompt = _first_field(row, preset.prompt_fields, "prompt")
    messages = None
    if isinstance(prompt, str):
        question = prompt
    elif isinstance(prompt, list) or hasattr(prompt, "tolist"):
        messages = _as_messages(prompt)
        question = [m["content"] for m in messages if m["role"] == "user"][-1]
    else:
        raise ValueError(f"prompt must be a string or a chat list, got {type(prompt).__name__}")
    if not question.strip():
        raise ValueError("empty prompt")
    answer_field, raw = _first_field(row, preset.answer_fields, "answer")
    answer = _as_answer(raw)
    if preset.answer_transform is not None:
        answer = preset.answer_transform(answer_field, answer)
    answer = answer.strip()
    if not answer:
        raise ValueError(f"empty answer in field {answer_field!r}")
    return Example(question=question, answer=answer, messages=messages)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, int, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        first = f.read(1)
        while first and first.isspace():
            first = f.read(1)
        f.seek(0)
        if first == "[":  # a JSON array file
            for i, row in enumerate(json.load(f), start=1):
                yield str(path), i, row
            return
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = _BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")
            yield str(path), line_no, row


def _iter_parquet(path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield str(path), i, row


def _iter_dataset(ds, label: str) -> Iterator[tuple[str, int, Any]]:
    for i, row in enumerate(ds, start=1):
        yield label, i, row


@dataclass
class _BadRow:
    reason: str


_FILE_READERS = {".jsonl": _iter_jsonl, ".json": _iter_jsonl, ".gz": _iter_jsonl, ".parquet": _iter_parquet}


def _reader_for(path: Path) -> Callable[[Path], Iterator] | None:
    return _FILE_READERS.get(path.suffix.lower())


def iter_rows(path: str | None, split: str = "train", preset: str = "arithmetic",
              subset: str | None = None) -> Iterator[tuple[str, int, Any]]:
    """(file label, 1-based row, raw row) for every row of a source (see the module docstring).

    `subset` is a hub dataset's configuration name (GSM8K's `main` or `socratic`): passed to
    `datasets.load_dataset`, and for a local directory (a hub snapshot) it picks the files under
    a folder of that name.
    """
    if path is None:
        if preset != "arithmetic":
            raise DataError(f"data preset {preset!r} needs data.path (only 'arithmetic' has a bundled set)")
        if split not in BUNDLED_SPLITS:
            raise DataError(f"bundled arithmetic split must be one of {BUNDLED_SPLITS}, got {split!r}")
        yield from _iter_jsonl(DATA_DIR / f"arithmetic_{split}.jsonl")
        return
    local = Path(path).expanduser()
    if local.is_file():
        reader = _reader_for(local)
        if reader is None:
            raise DataError(f"{local}: unsupported file type (use .jsonl, .json, .jsonl.gz or .parquet)")
        yield from reader(local)
        return
    if local.is_dir():
        if any((local / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(str(local))
            if isinstance(ds, DatasetDict):
                if split not in ds:
                    raise DataError(f"{local}: no split {split!r} (has {sorted(ds)})")
                ds = ds[split]
            yield from _iter_dataset(ds, f"{local}[{split}]")
            return
        files = sorted(p for p in local.rglob("*") if p.is_file() and _reader_for(p) and split in p.name
                       and (subset is None or subset in p.relative_to(local).parts[:-1]))
        if not files:
            where = f" under a folder {subset!r}" if subset else ""
            raise DataError(f"{local}: no .jsonl / .parquet file with {split!r} in its name{where}, "
                            "and not a directory saved by datasets")
        for file in files:
            yield from _reader_for(file)(file)
        return
    if path.startswith((".", "/", "~")) or path.endswith(tuple(_FILE_READERS)):
        raise DataError(f"data path {path!r} does not exist")
    try:
        from datasets import load_dataset

        ds = load_dataset(path, subset, split=split)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        what = f"{path!r} (subset {subset!r}, split {split!r})" if subset else f"{path!r} (split {split!r})"
        raise DataError(f"cannot load dataset {what} with datasets.load_dataset "
                        f"(no internet? a typo? a dataset with several configurations needs "
                        f"data.subset): {exc}") from exc
    yield from _iter_dataset(ds, f"{path}[{split}]")


def load_examples(source_cfg, *, skip_bad_rows: bool | None = None, stats: dict | None = None,
                  name: str | None = None) -> list[Example]:
    """Every good row of one source as Examples (no tokenizer needed: usable by evaluation tools).

    `source_cfg` has DataSource's attributes (preset, path, subset, split, prompt_field, answer_field);
    `skip_bad_rows` defaults to the object's own attribute (else False). Bad rows go to
    `stats["bad_rows"]` when skipped.
    """
    preset_name = getattr(source_cfg, "preset", "arithmetic")
    preset = resolve_preset(preset_name, getattr(source_cfg, "prompt_field", None),
                            getattr(source_cfg, "answer_field", None))
    if skip_bad_rows is None:
        skip_bad_rows = bool(getattr(source_cfg, "skip_bad_rows", False))
    stats = stats if stats is not None else {}
    stats.setdefault("bad_rows", 0)
    path, split = getattr(source_cfg, "path", None), getattr(source_cfg, "split", "train")
    source = name or preset_name
    examples = []
    for label, row_no, row in iter_rows(path, split, preset_name, getattr(source_cfg, "subset", None)):
        try:
            if isinstance(row, _BadRow):
                raise ValueError(row.reason)
            example = row_to_example(row, preset)
        except ValueError as exc:
            if not skip_bad_rows:
                raise DataError(f"{label}: row {row_no}: {exc} (set data.skip_bad_rows=true to skip "
                                "malformed rows)") from None
            stats["bad_rows"] += 1
            continue
        example.source, example.row = source, row_no
        examples.append(example)
    if not examples:
        raise DataError(f"data source {source!r} ({path or 'bundled'}, split {split!r}) has no usable rows")
    return examples


# ---------------------------------------------------------------------------------------- templating
def resolve_system_prompt(system_prompt: str | None) -> str | None:
    """A SYSTEM_PROMPTS name -> its text ("none" -> None); any other string is used verbatim."""
    if system_prompt is None:
        return None
    if system_prompt in SYSTEM_PROMPTS:
        return SYSTEM_PROMPTS[system_prompt]
    return system_prompt


def build_messages(question: str | list[dict], system_prompt: str | None = "think_answer") -> list[dict]:
    """Chat messages for a question (or a dataset's chat list): the system prompt and its
    demonstrations (FEW_SHOT) first, unless the chat list already has a system message."""
    system = resolve_system_prompt(system_prompt)
    messages = ([{"role": "user", "content": question}] if isinstance(question, str)
                else [dict(m) for m in question])
    if system is not None and not any(m["role"] == "system" for m in messages):
        demos = []
        for user, assistant in FEW_SHOT.get(system_prompt, []):
            demos += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages = [{"role": "system", "content": system}] + demos + messages
    return messages


def apply_chat_template(tokenizer, question: str | list[dict], system_prompt: str | None = "think_answer") -> str:
    """The chat-templated prompt text, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; rlengine formats prompts as chats "
                        "(use an instruct/chat model or set tokenizer.chat_template)")
    return tokenizer.apply_chat_template(build_messages(question, system_prompt),
                                         add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of templated prompts; the template already holds any BOS, so none is added (a
    doubled leading BOS is collapsed)."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for ids in encoded:
        ids = list(ids)
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------- stream
@dataclass
class Prompt:
    """A ready prompt: token ids for the sampler, the ground truth for the reward."""

    prompt_ids: list[int]
    prompt_text: str       # chat-templated
    question: str
    answer: str            # ground truth as a string
    source: str
    row: int               # 1-based row in the source file (JSONL: line number)


@dataclass
class _Source:
    name: str
    weight: float
    prompts: list[Prompt]
    epoch: int = 0
    index: int = 0
    _order: np.ndarray | None = field(default=None, repr=False)
    _order_epoch: int = -1


def source_configs(cfg) -> list:
    """The data sources of a DataConfig-like object: its mixture, or itself as the single source."""
    mixture = list(getattr(cfg, "mixture", None) or [])
    return mixture if mixture else [cfg]


class PromptStream:
    """Infinite seeded stream of Prompts over one or several weighted sources (see module docstring).

    Each source walks its own permutation (re-drawn from (seed, source, epoch) every epoch);
    with several sources, draw t picks a source by weight from an RNG seeded by (seed, t). The
    position is therefore just (draws, per-source epoch and index): saved and restored exactly.
    """

    _MIX_STREAM = 0x6D6978  # separates the mixture RNG from the permutation RNGs

    def __init__(self, sources: list[_Source], seed: int = 42, shuffle: bool = True, stats: dict | None = None):
        if not sources:
            raise DataError("no data sources")
        self._sources = sources
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._draws = 0
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise DataError(f"mixture weights must be positive, got {weights.tolist()}")
        self._cum_weights = np.cumsum(weights / weights.sum())
        self.stats = stats if stats is not None else {}
        self.stats.setdefault("num_prompts", sum(len(s.prompts) for s in sources))

    @property
    def sources(self) -> list[str]:
        return [s.name for s in self._sources]

    def __len__(self) -> int:
        return sum(len(s.prompts) for s in self._sources)

    def _order(self, si: int) -> np.ndarray:
        src = self._sources[si]
        if src._order_epoch != src.epoch:
            n = len(src.prompts)
            if self.shuffle:
                src._order = np.random.default_rng([self.seed, si, src.epoch]).permutation(n)
            else:
                src._order = np.arange(n)
            src._order_epoch = src.epoch
        return src._order

    def _pick_source(self, draw: int) -> int:
        if len(self._sources) == 1:
            return 0
        u = np.random.default_rng([self.seed, self._MIX_STREAM, draw]).random()
        return min(int(np.searchsorted(self._cum_weights, u, side="right")), len(self._sources) - 1)

    def next_prompt(self) -> Prompt:
        si = self._pick_source(self._draws)
        self._draws += 1
        src = self._sources[si]
        prompt = src.prompts[int(self._order(si)[src.index])]
        src.index += 1
        if src.index == len(src.prompts):
            src.epoch, src.index = src.epoch + 1, 0
        return prompt

    def next_batch(self, k: int) -> list[Prompt]:
        """The next `k` prompts (wrapping epochs as needed)."""
        return [self.next_prompt() for _ in range(k)]

    def state_dict(self) -> dict:
        """The exact position (JSON-serialisable)."""
        return {"version": 1, "seed": self.seed, "shuffle": self.shuffle, "draws": self._draws,
                "sources": [{"name": s.name, "size": len(s.prompts), "epoch": s.epoch, "index": s.index}
                            for s in self._sources]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict` (the data must be the same: sizes are checked)."""
        saved = state.get("sources", [])
        now = [(s.name, len(s.prompts)) for s in self._sources]
        if [(s["name"], s["size"]) for s in saved] != now:
            raise DataError(f"cannot restore the data position: the checkpoint has sources "
                            f"{[(s['name'], s['size']) for s in saved]}, this run has {now} "
                            "(the data or its filtering changed)")
        if state.get("seed", self.seed) != self.seed or state.get("shuffle", self.shuffle) != self.shuffle:
            raise DataError(f"cannot restore the data position: seed/shuffle changed "
                            f"({state.get('seed')}/{state.get('shuffle')} -> {self.seed}/{self.shuffle})")
        self._draws = int(state["draws"])
        for src, s in zip(self._sources, saved):
            src.epoch, src.index = int(s["epoch"]), int(s["index"])

    @property
    def epoch(self) -> int:
        """Completed passes over the first source (the only one for a single-source stream)."""
        return self._sources[0].epoch


def _source_names(configs: list) -> list[str]:
    names, seen = [], {}
    for c in configs:
        base = getattr(c, "preset", "arithmetic")
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return names


def build_prompt_stream(cfg, tokenizer) -> PromptStream:
    """Load, template, tokenize and length-filter every source of `cfg` (DataConfig-like)."""
    configs = source_configs(cfg)
    skip = bool(getattr(cfg, "skip_bad_rows", False))
    max_tokens = int(getattr(cfg, "max_prompt_tokens", 512))
    system_prompt = getattr(cfg, "system_prompt", "think_answer")
    stats: dict = {"num_prompts": 0, "dropped_too_long": 0, "bad_rows": 0, "per_source": {}}
    sources = []
    for source_cfg, name in zip(configs, _source_names(configs)):
        source_stats = {"bad_rows": 0}
        examples = load_examples(source_cfg, skip_bad_rows=skip, stats=source_stats, name=name)
        texts = [apply_chat_template(tokenizer, e.messages or e.question, system_prompt) for e in examples]
        ids = encode_prompts(tokenizer, texts)
        prompts = [Prompt(prompt_ids=i, prompt_text=t, question=e.question, answer=e.answer, source=name, row=e.row)
                   for e, t, i in zip(examples, texts, ids) if len(i) <= max_tokens]
        source_stats["dropped_too_long"] = len(examples) - len(prompts)
        source_stats["num_prompts"] = len(prompts)
        if not prompts:
            raise DataError(f"data source {name!r}: all {len(examples)} prompts are longer than "
                            f"data.max_prompt_tokens={max_tokens}")
        weight = float(getattr(source_cfg, "weight", 1.0)) if source_cfg is not cfg else 1.0
        sources.append(_Source(name=name, weight=weight, prompts=prompts))
        stats["per_source"][name] = source_stats
        for key in ("num_prompts", "dropped_too_long", "bad_rows"):
            stats[key] += source_stats[key]
    return PromptStream(sources, seed=int(getattr(cfg, "seed", 42)), shuffle=bool(getattr(cfg, "shuffle", True)),
                        stats=stats)

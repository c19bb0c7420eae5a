"""Answer extraction from model output: the last `<answer>...</answer>` or the last `\\boxed{...}`.

Pure string functions (no math-verify here). Both return None when there is nothing to extract,
so a caller can tell "no answer" from "an empty answer" ("" is returned for `<answer></answer>`).
"""
from __future__ import annotations

import re

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# `\boxed{`, `\boxed {` and `\fbox{` open a box; the payload is found by brace matching.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# `\boxed 5` (no braces, a single token) is legal LaTeX that models sometimes write.
_BOX_BARE = re.compile(r"\\boxed\s+([^\s${}]+)")


def extract_answer_tag(text: str) -> str | None:
    """The stripped content of the last complete `<answer>...</answer>` block, or None."""
    blocks = _ANSWER_BLOCK.findall(text)
    if not blocks:
        return None
    return blocks[-1].strip()


def _match_braces(text: str, open_index: int) -> int | None:
    """Index of the `}` closing the `{` at `open_index` (escaped `\\{`/`\\}` ignored), or None."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # skip the escaped character (\{ \} \\)
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The stripped payload of the last complete `\\boxed{...}` (nested braces kept), or None.

    A box whose braces never close is ignored (an earlier complete box is still found).
    """
    candidates: list[tuple[int, str]] = []
    for match in _BOX_OPEN.finditer(text):
        open_index = match.end() - 1
        close_index = _match_braces(text, open_index)
        if close_index is not None:
            candidates.append((match.start(), text[open_index + 1:close_index].strip()))
    for match in _BOX_BARE.finditer(text):
        candidates.append((match.start(), match.group(1).strip()))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


EXTRACTORS = {"answer": extract_answer_tag, "boxed": extract_boxed}


def extract(text: str, how: str) -> str | None:
    """Dispatch on `how` ("answer" or "boxed")."""
    try:
        extractor = EXTRACTORS[how]
    except KeyError:
        raise ValueError(f"unknown extraction {how!r}; valid: {sorted(EXTRACTORS)}") from None
    return extractor(text)

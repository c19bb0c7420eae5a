"""The gate paper's format reward (Sec. 5.1, eq. 10): tiers 1 / 0.5 / 0.25 / 0.

  1     the whole response is `<think> ... </think> <answer> ... </answer>` (whitespace around the
        tags allowed, each tag exactly once, nothing outside the two blocks)
  0.5   otherwise, it begins with `<think>` and ends with `</answer>`
  0.25  otherwise, it does one of those two
  0     otherwise
"""
from __future__ import annotations

import re

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FULL = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def is_well_formed(text: str) -> bool:
    """True when `text` is exactly one think block followed by one answer block."""
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    return _FULL.fullmatch(text) is not None


def format_reward(text: str) -> float:
    """1.0, 0.5, 0.25 or 0.0 (see the module docstring)."""
    if is_well_formed(text):
        return 1.0
    stripped = text.strip()
    begins = stripped.startswith("<think>")
    ends = stripped.endswith("</answer>")
    if begins and ends:
        return 0.5
    if begins or ends:
        return 0.25
    return 0.0

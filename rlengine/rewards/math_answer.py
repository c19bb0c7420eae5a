"""Mathematical equality of an extracted answer and a ground truth, via math-verify.

Ground truths come as datasets store them: plain numbers (`72`, `1,000`) or LaTeX without `$`
(`\\frac{1}{2}`, `\\sqrt{2}`). A string is parsed two ways and the candidates of both are compared:
  - wrapped as `\\boxed{s}` (LaTeX extraction: reads bare LaTeX such as `\\frac{\\pi}{2}`),
  - as is (math-verify's default: finds `$...$` or the last number in free text, `72 dollars`).
A ground truth that is a plain number is read as is, any other as LaTeX (boxed). The answer
matches when either reading of it verifies against the ground truth.

math-verify bounds its own parse / verify time with SIGALRM, which only works on the main thread;
off the main thread those timeouts are switched off (then only a process pool bounds the time).
Nothing here `eval`s or `exec`s model output.
"""
from __future__ import annotations

import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rlengine.rewards.extract import extract

# math-verify's own timeout (integer seconds, SIGALRM) for each parse / verify call.
# Reward workers set it from their pool's timeout; None disables it.
VERIFY_TIMEOUT_S: int | None = 5

_LATEX_FIRST = [LatexExtractionConfig(), ExprExtractionConfig()]


def _own_timeout() -> int | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    return VERIFY_TIMEOUT_S


def _normalise(s: str) -> str:
    return "".join(s.split()).strip("$").strip(".").casefold()


_PLAIN_NUMBER = re.compile(r"-?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?|-?\.\d+")
_LATEX_HINT = re.compile(r"[\\^{}_()\[\]]")


def _parse_plain(s: str, timeout_s: int | None) -> list:
    return parse(s, parsing_timeout=timeout_s)


def _parse_boxed(s: str, timeout_s: int | None) -> list:
    if s.count("{") != s.count("}"):  # an unbalanced string would escape the box
        return []
    return parse("\\boxed{" + s + "}", extraction_config=_LATEX_FIRST, parsing_timeout=timeout_s)


def parse_ground_truth(s: str, timeout_s: int | None = None) -> list:
    """The math-verify reading of a dataset answer: a plain number as is, anything else as LaTeX."""
    s = s.strip()
    if _PLAIN_NUMBER.fullmatch(s):
        return _parse_plain(s, timeout_s)
    return _parse_boxed(s, timeout_s) or _parse_plain(s, timeout_s)


def answers_match(answer: str, ground_truth: str) -> bool:
    """True when math-verify finds `answer` equal to `ground_truth` (see module docstring).

    Cheapest readings first: string equality, then the default free-text parse, then (only for
    strings that look like LaTeX or that the default parse cannot read) the boxed LaTeX parse.
    """
    answer, ground_truth = answer.strip(), ground_truth.strip()
    if not answer or not ground_truth:
        return False
    if _normalise(answer) == _normalise(ground_truth):
        return True
    timeout_s = _own_timeout()
    gold = parse_ground_truth(ground_truth, timeout_s)
    if not gold:
        return False
    plain = _parse_plain(answer, timeout_s)
    if plain and verify(gold, plain, timeout_seconds=timeout_s):
        return True
    if plain and (_PLAIN_NUMBER.fullmatch(answer) or not _LATEX_HINT.search(answer)):
        return False
    boxed = _parse_boxed(answer, timeout_s)
    return bool(boxed) and verify(gold, boxed, timeout_seconds=timeout_s)


def math_reward(text: str, ground_truth: str, extract: str = "answer") -> float:
    """1.0 if the answer extracted from `text` ("answer": last `<answer>` block, "boxed": last
    `\\boxed{}`) equals `ground_truth` mathematically, else 0.0 (also when nothing is extracted)."""
    answer = _extract(text, extract)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, str(ground_truth)) else 0.0


_extract = extract  # the parameter name `extract` shadows the function inside math_reward

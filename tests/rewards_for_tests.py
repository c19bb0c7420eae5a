"""Rewards for short engine and tool tests, named as `tests.rewards_for_tests:<function>`.

With a dozen new tokens the answer/format rewards are almost always 0 (no signal, advantages 0);
`digit_fraction` varies within every group, so the optimizer really moves the policy."""


def digit_fraction(text: str, ground_truth: str) -> float:
    """Fraction of the response's characters that are digits."""
    return sum(ch.isdigit() for ch in text) / max(1, len(text))


def has_digit(text: str, ground_truth: str) -> float:
    """1 when the response contains a digit: a 'correct' answer that a dozen tokens of the untrained
    model reach some of the time, so Pass@k of an evaluation of a short run is neither 0 nor 1."""
    return float(any(ch.isdigit() for ch in text))


from rlengine.rewards import register_reward  # noqa: E402  (light: no torch)


@register_reward("test_digits_and_brevity", parts=("digits", "brevity"))
def digits_and_brevity(text: str, ground_truth: str) -> dict[str, float]:
    """Two declared parts, so the trainer must log reward/digits and reward/brevity (and no
    reward/answer or reward/format, which this reward does not have)."""
    digits = digit_fraction(text, ground_truth)
    brevity = 1.0 / (1.0 + len(text) / 20.0)
    return {"reward": digits + brevity, "digits": digits, "brevity": brevity}


def nan_when_long(text: str, ground_truth: str) -> float:
    """A broken reward: NaN for any response over 5 characters."""
    return float("nan") if len(text) > 5 else 0.0


def vowel_fraction(text: str, ground_truth: str) -> float:
    """Fraction of the response's letters that are vowels: what varies within every group of the
    random tiny model (tests/conftest.py `tiny_model_dir`), whose tokens are almost never digits."""
    letters = [ch for ch in text.lower() if ch.isalpha()]
    return sum(ch in "aeiou" for ch in letters) / max(1, len(letters))


def hangs(text: str, ground_truth: str) -> float:
    """A reward that never returns (a verifier stuck on a pathological answer): the pool must kill
    it at reward.timeout_s."""
    import threading

    threading.Event().wait()
    return 1.0

"""A reward for short engine tests, named in configs as `tests.rewards_for_tests:digit_fraction`.

With a dozen new tokens the answer/format rewards are almost always 0 (no signal, advantages 0);
this one varies within every group, so the optimizer really moves the policy."""


def digit_fraction(text: str, ground_truth: str) -> float:
    """Fraction of the response's characters that are digits."""
    return sum(ch.isdigit() for ch in text) / max(1, len(text))

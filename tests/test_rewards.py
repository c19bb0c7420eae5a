"""Pure reward functions with the real math-verify: extraction, format tiers, equality, registry."""
import pytest

from rlengine.rewards import (REWARDS, answers_match, extract_answer_tag, extract_boxed, format_reward,
                              get_reward, math_reward, register_reward)


# ------------------------------------------------------------------ extraction
@pytest.mark.parametrize("text, expected", [
    ("<answer>42</answer>", "42"),
    ("<answer> 1 </answer> then <answer>\n 2 \n</answer>", "2"),            # the last block, stripped
    ("<answer>a\nb</answer>", "a\nb"),                                       # multi-line
    ("<answer></answer>", ""),                                               # empty is not None
    ("no tags at all", None),
    ("<answer>unclosed", None),
    ("<answer>1</answer> <answer>never closed", "1"),                       # last *complete* block
])
def test_extract_answer_tag(text, expected):
    assert extract_answer_tag(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{1} and finally \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),                                # nested braces
    (r"\boxed{\frac{\sqrt{3}}{2}+{x}}", r"\frac{\sqrt{3}}{2}+{x}"),
    (r"\boxed {7}", "7"),
    (r"\boxed 7", "7"),
    (r"\fbox{8}", "8"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),                                      # escaped braces don't count
    (r"\boxed{3} then \boxed{unclosed", "3"),
    (r"\boxed{", None),
    ("nothing", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ------------------------------------------------------------------ format tiers
@pytest.mark.parametrize("text, tier", [
    ("<think>add 2 and 3</think><answer>5</answer>", 1.0),
    ("  <think>\n reasoning \n</think>\n\n<answer> 5 </answer>\n", 1.0),      # whitespace around tags
    ("<think></think><answer></answer>", 1.0),
    ("<think>a</think> stray text <answer>5</answer>", 0.5),                # begins/ends right, text between
    ("<think>a</think><answer>5</answer><answer>6</answer>", 0.5),          # a tag twice
    ("<think>a<think>b</think><answer>5</answer>", 0.5),
    ("<think>no end tag at all", 0.25),                                      # begins with <think> only
    ("<think>a</think><answer>5</answer> trailing words", 0.25),
    ("I think <answer>5</answer>", 0.25),                                    # ends with </answer> only
    ("<answer>5</answer>", 0.25),
    ("The answer is 5.", 0.0),
    ("</think><answer>5", 0.0),
    ("", 0.0),
])
def test_format_reward_tiers(text, tier):
    assert format_reward(text) == tier


# ------------------------------------------------------------------ math-verify equality
@pytest.mark.parametrize("answer, truth", [
    (r"\frac{1}{2}", "0.5"),
    ("0.5", r"\frac{1}{2}"),
    ("1,000", "1000"),
    ("1000", "1,000"),
    ("72", "72"),
    ("The answer is 72", "72"),
    ("72 dollars", "72"),
    ("18.0", "18"),
    (r"2^{1/2}", r"\sqrt{2}"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    ("0.75", r"\dfrac{3}{4}"),
    ("1+x^2", "x^2+1"),
    ("x = 3", "3"),
    ("(1, 2)", "(1,2)"),
    (r"\boxed{4}", "4"),
    ("$100$", "100"),
])
def test_answers_equal(answer, truth):
    assert answers_match(answer, truth)


@pytest.mark.parametrize("answer, truth", [
    ("73", "72"),
    ("-5", "5"),
    ("1,000,000", "1000"),
    ("0.6", r"\frac{1}{2}"),
    ("two", "2"),
    ("", "2"),
    ("2", "(1,2)"),
    (r"\sqrt{3}", r"\sqrt{2}"),
])
def test_answers_differ(answer, truth):
    assert not answers_match(answer, truth)


def test_math_reward_extract_modes():
    think = "<think>3 and 4 make 7</think> <answer>7</answer>"
    assert math_reward(think, "7", extract="answer") == 1.0
    assert math_reward(think, "8", extract="answer") == 0.0
    assert math_reward(think, "7", extract="boxed") == 0.0                   # no box: nothing to extract
    boxed = r"First 1/4 then \boxed{1/4}, no wait \boxed{\frac{1}{2}}"
    assert math_reward(boxed, "0.5", extract="boxed") == 1.0                 # the last box counts
    assert math_reward(boxed, "0.25", extract="boxed") == 0.0
    assert math_reward("7", "7", extract="answer") == 0.0                    # bare text: no <answer>
    assert math_reward("<answer></answer>", "7") == 0.0
    with pytest.raises(ValueError, match="boxed"):
        math_reward("x", "1", extract="last_line")


# ------------------------------------------------------------------ registry
def test_builtin_rewards_and_parts():
    assert {"format", "answer", "boxed", "answer_format"} <= set(REWARDS)
    good = "<think>2+2</think><answer>4</answer>"
    assert get_reward("answer_format")(good, "4") == {"reward": 2.0, "answer": 1.0, "format": 1.0}
    assert get_reward("answer_format")("I think <answer>5</answer>", "4") == {"reward": 0.25, "answer": 0.0,
                                                                              "format": 0.25}
    assert get_reward("answer")(good, "4") == {"reward": 1.0}
    assert get_reward("boxed")(r"\boxed{4}", "4") == {"reward": 1.0}
    assert get_reward("format")(good, "999") == {"reward": 1.0}
    assert get_reward("answer_format").zero() == {"reward": 0.0, "answer": 0.0, "format": 0.0}


def test_unknown_reward_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_reward("acuracy")
    assert "answer_format" in str(err.value) and "boxed" in str(err.value)


def test_module_function_reference():
    spec = get_reward("tests.test_rewards_helpers:length_reward")
    assert spec("abcd", "") == {"reward": 4.0}
    decorated = get_reward("tests.test_rewards_helpers:shouting")         # registered by decorator
    assert decorated.name == "shouting" and decorated.parts == ("loud",)
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        get_reward("tests.test_rewards_helpers:missing")


def test_register_reward_decorator():
    @register_reward("_test_const", parts=("half",))
    def const(text, ground_truth):
        return {"reward": 1.0, "half": 0.5}

    try:
        assert get_reward("_test_const")("x", "y") == {"reward": 1.0, "half": 0.5}
        with pytest.raises(ValueError, match="already registered"):
            register_reward("_test_const")(lambda t, g: 0.0)
    finally:
        REWARDS.pop("_test_const")


def test_check_finite_names_the_reward_the_part_and_the_sample():
    from rlengine.rewards import RewardError, check_finite

    ok = [{"reward": 1.0, "answer": 1.0}, {"reward": 0.0, "answer": 0.0}]
    check_finite(ok, "answer_format", lambda i: f"sample {i}")
    for bad, words in [([{"reward": float("nan")}], ["nan", "its total", "sample 0"]),
                       ([{"reward": 1.0}, {"reward": 1.0, "format": float("inf")}], ["inf", "part 'format'", "sample 1"])]:
        with pytest.raises(RewardError) as e:
            check_finite(bad, "my_reward", lambda i: f"sample {i}")
        assert "'my_reward'" in str(e.value) and all(w in str(e.value) for w in words), str(e.value)

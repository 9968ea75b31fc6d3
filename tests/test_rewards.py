"""Rewards: the reference's format rules and F1 scoring, exact match, math equivalence, routing.
Every expected score below is worked out by hand in the comment next to it."""

import numpy as np
import pytest

from arpo_fast.rollout.rewards import (
    RewardConfig,
    RewardResult,
    compute_reward,
    exact_match,
    last_boxed,
    math_equal,
    normalize_answer,
    register_reward,
    token_f1,
    unbox,
    validate_format,
)

SEARCH = "<search>query</search> <result>\nfound\n</result>"
PYTHON = "<python>print(1)</python> <result>\n1\n</result>"


def response(boxed="\\boxed{Paris}", calls=(), think="<think>reasoning</think>"):
    return f"{think}{''.join(calls)}<answer>The answer is {boxed}</answer>"


def score(text, truth, source="any"):
    return compute_reward(source, text, truth).score


# -- normalisation and F1 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("The Eiffel Tower", "eiffel tower"),  # case and the article
        ("an apple, a pear", "apple pear"),  # articles and punctuation
        ("  New   YORK\n", "new york"),  # whitespace
        ("U.S.A.", "usa"),  # punctuation inside a word
        ("1,000", "1000"),  # numbers lose their separators...
        ("3.14", "314"),  # ...and decimal points (SQuAD's rule)
        ("ant theory", "ant theory"),  # 'an'/'the' only as whole words
        ("", ""),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_token_f1_by_hand():
    assert token_f1("Eiffel Tower", "the eiffel tower") == 1.0
    # pred {paris, france}, gold {paris}: P = 1/2, R = 1, F1 = 2 * 0.5 / 1.5 = 2/3
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    # pred {a b c d} vs gold {b c e}: same 2, P = 2/4, R = 2/3, F1 = 2*(1/2)(2/3)/(7/6) = 4/7
    assert token_f1("a1 b c d", "b c e") == pytest.approx(0.5714285714)
    assert token_f1("12", "12.0") == 0.0  # "12" vs "120"
    assert token_f1("", "Paris") == 0.0 and token_f1("Paris", "") == 0.0
    # yes/no must match exactly: 'yes' vs 'yes it is' scores 0, not 1/2
    assert token_f1("yes", "yes, it is") == 0.0
    assert token_f1("no", "No.") == 1.0
    # the best of several ground truths: 'paris' vs ['London', 'Paris city'] -> P=1, R=1/2 -> 2/3
    assert token_f1("Paris", ["London", "Paris city"]) == pytest.approx(2 / 3)


def test_exact_match():
    assert exact_match("the Eiffel Tower!", "Eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert exact_match("Berlin", ["Paris", "berlin"]) == 1.0


def test_math_equal():
    assert math_equal("\\frac{1}{2}", "0.5") == 1.0
    assert math_equal("(x+1)^2", "x^2+2x+1") == 1.0
    assert math_equal("\\{1,2\\}", "\\{2,1\\}") == 1.0
    assert math_equal("3", "4") == 0.0
    assert math_equal("", "4") == 0.0


# -- boxed extraction -----------------------------------------------------------------------


def test_last_boxed_with_nested_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}} end") == "\\boxed{\\frac{1}{\\sqrt{2}}}"
    assert unbox(last_boxed("x \\boxed{a{b}c}")) == "a{b}c"
    assert last_boxed("\\boxed{unclosed {x}") is None
    assert last_boxed("no box") is None
    assert last_boxed("\\fbox{7}") == "\\fbox{7}"
    assert unbox(last_boxed("so \\boxed 42$ done")) == "42"  # the space form runs to '$'
    with pytest.raises(ValueError):
        unbox("\\fbox{7}")
    with pytest.raises(ValueError):
        unbox(None)


# -- format rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<answer>\\boxed{x}</answer>", "no <think>"),
        ("<think>a</think><think>b<answer>\\boxed{x}</answer>", "not paired"),
        ("<think>a</think><answer>\\boxed{x}</answer><answer>\\boxed{y}</answer>", "exactly one"),
        ("<think>a</think>", "exactly one"),
        (
            "<think>a</think><search>q</search><answer>\\boxed{x}</answer>",
            "search/result tags are incomplete",
        ),
        ("<think>a</think><search>q<result>r</result></search><answer>\\boxed{x}</answer>", "wrong order"),
        ("<think>a</think><python>x</python> <result>r<answer>\\boxed{x}</answer>", "incomplete"),
        ("<think>a</think></answer>\\boxed{x}<answer>", "comes before"),
        ("<think>a</think><answer>Paris</answer>", "no \\boxed{}"),
        ("<think>a</think><answer>\\boxed{Paris</answer>", "no \\boxed{}"),
    ],
)
def test_bad_formats(text, reason):
    valid, why = validate_format(text)
    assert not valid and reason in why
    result = compute_reward("any", text, "Paris")
    assert result.score == -1.0 and result.reason.startswith("bad format")


def test_good_format():
    assert validate_format(response(calls=[SEARCH, PYTHON, SEARCH])) == (True, "format is correct")


# -- whole rewards --------------------------------------------------------------------------


def test_reference_scores_by_hand():
    assert score(response(), "Paris") == 1.0  # F1 1, no tools
    assert score(response(calls=[SEARCH]), "Paris") == 1.0  # one tool: no bonus
    assert score(response(calls=[SEARCH, PYTHON]), "Paris") == pytest.approx(1.1)
    # F1 2/3 ('paris france' vs 'paris') plus the bonus for both tools
    both = response("\\boxed{Paris, France}", [PYTHON, SEARCH])
    assert score(both, "Paris") == pytest.approx(2 / 3 + 0.1)
    assert score(response("\\boxed{Berlin}", [SEARCH, PYTHON]), "Paris") == 0.0  # wrong: no bonus
    assert score(response("\\boxed{}"), "Paris") == 0.0  # empty answer
    assert score(response(), "") == 0.0  # missing ground truth
    # nested braces: '\\frac{1}{2}' normalises to 'frac12' on both sides
    assert score(response("\\boxed{\\frac{1}{2}}"), "\\frac{1}{2}") == 1.0
    # a closing brace elsewhere passes the format check, but no \boxed{} closes: -1
    unclosed = compute_reward("any", response("} \\boxed{Paris"), "Paris")
    assert unclosed.score == -1.0 and "no closed" in unclosed.reason


def test_result_fields_and_eos():
    result = compute_reward("any", response() + "<|im_end|>", "Paris", eos_token="<|im_end|>")
    assert result == RewardResult(1.0, "correct", "Paris", 1.0)


def test_routing_by_data_source():
    config = RewardConfig(by_data_source={"gsm8k": "math", "nq": "exact_match"})
    text = response("\\boxed{0.5}")
    assert compute_reward("gsm8k", text, "\\frac{1}{2}", config).score == 1.0
    assert compute_reward("hotpotqa", text, "\\frac{1}{2}", config).score == 0.0  # F1: '05' vs 'frac12'
    partial = response("\\boxed{Paris France}")
    assert compute_reward("nq", partial, "Paris", config).score == 0.0
    assert compute_reward("other", partial, "Paris", config).score == pytest.approx(2 / 3)


def test_custom_reward_registry():
    def length_reward(text, truth, **kw):
        return RewardResult(float(len(text)), "length")

    register_reward("test_length", length_reward, replace=True)
    config = RewardConfig(by_data_source={"mine": "test_length"})
    assert compute_reward("mine", "abc", "x", config).score == 3.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length", length_reward)
    with pytest.raises(KeyError, match="no reward named 'nope'"):
        RewardConfig(default="nope")


# -- what the reward reads: the model's own text -------------------------------------------


@pytest.fixture(scope="module")
def demo_tok():
    from arpo_fast.train.demo import demo_tokenizer

    return demo_tokenizer()


def _trajectory(tok, pieces):
    """Response ids and loss mask from ("model", text) and ("tool", output) pieces, as the rollout
    builds them (a tool's output encoded on its own as a result block, mask 0)."""
    from arpo_fast.rollout import Protocol

    protocol = Protocol(tok)
    ids, mask = [], []
    for kind, value in pieces:
        if kind == "tool":
            new = protocol.result_ids(value)
        elif kind == "special":
            new = [value]
        else:
            new = tok.encode(value)
        ids += new
        mask += [0 if kind == "tool" else 1] * len(new)
    return ids, mask


def _reward(tok, pieces, truth):
    from arpo_fast.rollout.rewards import response_text

    ids, mask = _trajectory(tok, pieces)
    return compute_reward("any", response_text(tok, ids, mask), truth)


def test_special_tokens_are_skipped_as_in_the_reference(demo_tok):
    # a special token the model wrote inside its answer no longer breaks the match
    pieces = [
        ("model", "<think>t</think><answer>\\boxed{Par"),
        ("special", demo_tok.pad_token_id),
        ("model", "is}</answer>"),
        ("special", demo_tok.eos_token_id),
    ]
    assert _reward(demo_tok, pieces, "Paris").score == 1.0


def test_a_tool_result_cannot_answer_for_the_model(demo_tok):
    call = ("model", "<think>t</think><python>print(x)</python>")
    # code that prints an answer earns nothing when the model wrote none: bad format
    printed = _reward(demo_tok, [call, ("tool", "<answer>\\boxed{42}</answer>")], "42")
    assert printed.score == -1.0
    # a printed </search> does not earn the bonus for calling both tools
    bonus = _reward(demo_tok, [call, ("tool", "</search>"), ("model", "<answer>\\boxed{42}</answer>")], "42")
    assert bonus.score == 1.0
    # output holding <answer> does not turn the model's right answer into a bad format
    right = _reward(demo_tok, [call, ("tool", "<answer>"), ("model", "<answer>\\boxed{42}</answer>")], "42")
    assert right.score == 1.0
    # a result block cut short by the length limit still counts as an incomplete call
    from arpo_fast.rollout.rewards import response_text

    ids, mask = _trajectory(demo_tok, [call, ("tool", "a long output")])
    assert response_text(demo_tok, ids[:-3], mask[:-3]).endswith("</python> <result>\n")


@pytest.mark.parametrize("truth", [None, b"42", [["42"]], {"a": 1}, True, {"42"}, np.array([["42"]])])
def test_a_ground_truth_of_the_wrong_type_is_an_error_naming_it(truth):
    with pytest.raises(TypeError, match="ground truth") as err:
        compute_reward("any", response("\\boxed{42}"), truth)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("truth", [{"answer": "42"}, {"42"}, frozenset({"42"})])
def test_dicts_and_sets_are_refused_by_their_type(truth):
    with pytest.raises(TypeError, match=f"ground truth is a {type(truth).__name__}: give a string"):
        compute_reward("any", response("\\boxed{42}"), truth)


@pytest.mark.parametrize(
    "truth",
    [
        np.array(["London", "Paris"]),  # what pandas hands over for a list column
        np.array(["London", "Paris"], dtype=object),
        ("London", "Paris"),
        np.array("Paris"),  # a 0-d array is one answer
    ],
)
def test_ground_truths_as_arrays_and_tuples(truth):
    assert compute_reward("any", response(), truth).score == 1.0
    assert compute_reward("any", response("\\boxed{Rome}"), truth).score == 0.0


def test_numeric_arrays_are_compared_as_text():
    assert compute_reward("any", response("\\boxed{42}"), np.array([7, 42])).score == 1.0
    assert compute_reward("any", response("\\boxed{2.5}"), np.array([2.5])).score == 1.0
    assert compute_reward("any", response("\\boxed{42}"), np.int64(42)).score == 1.0


def test_a_custom_reward_gets_an_array_as_a_list_of_python_values():
    seen = []
    register_reward(
        "test_seen", lambda text, truth, **kw: seen.append(truth) or RewardResult(0.0, "x"), replace=True
    )
    config = RewardConfig(default="test_seen")
    compute_reward("any", "text", np.array(["a", "b"]), config)
    compute_reward("any", "text", "a", config)
    assert seen == [["a", "b"], "a"] and type(seen[0][0]) is str


@pytest.mark.parametrize("empty", [[], (), np.array([], dtype=str)])
def test_an_empty_ground_truth_matches_no_answer(empty):
    for name in ("arpo_f1", "exact_match"):
        config = RewardConfig(default=name)
        result = compute_reward("any", response(calls=[SEARCH, PYTHON]), empty, config)
        assert (result.score, result.correctness, result.answer) == (0.0, 0.0, "Paris")
        assert compute_reward("any", "no tags", empty, config).score == -1.0
    assert token_f1("Paris", empty) == 0.0 and exact_match("", empty) == 0.0


def test_numeric_ground_truths_are_compared_as_text():
    assert compute_reward("any", response("\\boxed{42}"), 42).score == 1.0
    assert compute_reward("any", response("\\boxed{2.5}"), [2.5, "x"]).score == 1.0

"""Rewards for finished trajectories, picked per example by its ``data_source``.

The default, ``arpo_f1``, is the reference's scoring: -1 when the format is bad, else the token F1
(SQuAD normalisation) between the last ``\\boxed{}`` of the answer and the ground truth, plus 0.1
when F1 > 0 and both ``search`` and ``python`` were called. ``exact_match`` and ``math`` keep the
same format gate and bonus and change only how the answer is compared. Register your own with
:func:`register_reward`.
"""

from __future__ import annotations

import logging
import numbers
import re
import string
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from arpo_fast.rollout.protocol import ProtocolConfig

GroundTruth = Union[str, numbers.Number, Sequence[Union[str, numbers.Number]]]
"""A string or a number, or a sequence of those (a list, a tuple, a numpy array: what pandas and
verl hand over for list answers). An empty sequence is allowed: no answer matches it."""
DEFAULT_TAGS = ProtocolConfig()


@dataclass(frozen=True)
class RewardResult:
    """A trajectory's reward, why, the extracted answer and the correctness before the bonus."""

    score: float
    reason: str
    answer: Optional[str] = None
    correctness: float = 0.0


# -- format ---------------------------------------------------------------------------------


def validate_format(text: str, tags: ProtocolConfig = DEFAULT_TAGS) -> tuple[bool, str]:
    """The reference's format rules; returns (valid, reason).

    Balanced ``<think>`` tags with at least one pair; exactly one ``<answer>`` and one ``</answer>``,
    in that order; every tool call closed and followed by a ``<result>...</result>``, in order; and
    ``\\boxed{`` and ``}`` inside the answer.
    """
    think_open, think_close = tags.open_tag(tags.think_tag), tags.close_tag(tags.think_tag)
    if text.count(think_open) != text.count(think_close):
        return False, f"{think_open} and {think_close} are not paired"
    if text.count(think_open) == 0:
        return False, f"no {think_open} ... {think_close}"
    answer_open, answer_close = tags.open_tag(tags.answer_tag), tags.close_tag(tags.answer_tag)
    if text.count(answer_open) != 1 or text.count(answer_close) != 1:
        return False, f"not exactly one {answer_open} ... {answer_close}"
    for name in tags.tool_names:
        ok, reason = _calls_have_results(text, name, tags)
        if not ok:
            return False, reason
    start, end = text.find(answer_open), text.find(answer_close)
    if start > end:
        return False, f"{answer_close} comes before {answer_open}"
    inside = text[start:end]
    if "\\boxed{" not in inside or "}" not in inside:
        return False, "the answer has no \\boxed{}"
    return True, "format is correct"


def _calls_have_results(text: str, name: str, tags: ProtocolConfig) -> tuple[bool, str]:
    """Each ``<name>`` is followed, in order, by ``</name>``, ``<result>`` and ``</result>``."""
    call_open, call_close = tags.open_tag(name), tags.close_tag(name)
    result_open, result_close = tags.open_tag(tags.result_tag), tags.close_tag(tags.result_tag)
    pos = 0
    while (call := text.find(call_open, pos)) != -1:
        result = text.find(result_open, call)
        close = text.find(call_close, call)
        # the reference searches for </result> from the found <result>, or from the last character
        # when there is none; either way a missing tag fails below
        result_end = text.find(result_close, result if result != -1 else len(text) - 1)
        if -1 in (result, close, result_end):
            return False, f"{name}/{tags.result_tag} tags are incomplete"
        if not call < close < result < result_end:
            return False, f"{name}/{tags.result_tag} tags are in the wrong order"
        pos = result_end
    return True, ""


def response_text(
    tokenizer, response_ids: Sequence[int], loss_mask: Sequence[int], tags: ProtocolConfig = DEFAULT_TAGS
) -> str:
    """What the model wrote, as the reward reads it: its tokens decoded with special tokens
    skipped, each tool result block (the tokens with loss mask 0) reduced to its bare tags. What a
    tool printed can then neither fake an answer, nor a call that earns the bonus, nor break the
    format."""
    result_open, result_close = tags.open_tag(tags.result_tag), tags.close_tag(tags.result_tag)
    pieces, start = [], 0
    for end in range(1, len(response_ids) + 1):
        if end < len(response_ids) and bool(loss_mask[end]) == bool(loss_mask[start]):
            continue
        text = tokenizer.decode(list(response_ids[start:end]), skip_special_tokens=True)
        if not loss_mask[start]:  # a result block; the last one may be cut short by the length limit
            body = text.lstrip()
            text = ""
            if body.startswith(result_open):
                text = " " + result_open + "\n"
                if body.rstrip().endswith(result_close):
                    text += "\n" + result_close
        pieces.append(text)
        start = end
    return "".join(pieces)


# -- answer extraction ----------------------------------------------------------------------


def last_boxed(text: str) -> Optional[str]:
    """The last ``\\boxed{...}`` (braces matched, so nesting is kept) or ``\\boxed x`` in ``text``.

    Follows the reference: ``\\boxed x`` (with a space) wins when present and runs to the next
    ``$``; otherwise ``\\fbox{...}`` is used when there is no ``\\boxed``. None if not found or unclosed.
    """
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start : i + 1]
    return None


def unbox(boxed: Optional[str]) -> str:
    """The content of ``\\boxed{...}`` or ``\\boxed x``; ValueError for anything else."""
    if boxed is None:
        raise ValueError("no closed \\boxed{} in the answer")
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed ") :]
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{") : -1]
    raise ValueError(f"not a \\boxed{{}} expression: {boxed[:50]!r}")


def extract_answer(text: str, tags: ProtocolConfig = DEFAULT_TAGS) -> Optional[str]:
    """The text of the first ``<answer>...</answer>``, or None."""
    open_, close = re.escape(tags.open_tag(tags.answer_tag)), re.escape(tags.close_tag(tags.answer_tag))
    match = re.search(f"{open_}(.*?){close}", text.strip(), re.DOTALL)
    return match.group(1) if match else None


# -- answer comparison ----------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def _one_truth(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value)  # the reference crashes on a numeric ground truth
    raise TypeError(
        f"ground truth {value!r} ({type(value).__name__}) is not a string, a number or a sequence of those"
    )


def _is_array(value: Any) -> bool:
    """A numpy array (or anything shaped like one: a pandas Series, a torch tensor)."""
    return hasattr(value, "ndim") and hasattr(value, "tolist")


def ground_truths(ground_truth: Any) -> list[str]:
    """The accepted answers as strings: from a string or a number, or any sequence of those (a list,
    a tuple, a numpy array of strings or numbers). An empty sequence gives no answers, so no
    prediction matches it (the comparison scores 0). Dicts, sets and other types raise a one-line
    TypeError naming the type: a dict is no list of answers, and a set has no order to keep."""
    if _is_array(ground_truth):
        ground_truth = ground_truth.tolist()  # numpy scalars become Python str, int and float
    if isinstance(ground_truth, (Mapping, set, frozenset)):
        raise TypeError(
            f"ground truth is a {type(ground_truth).__name__}: give a string, a number, "
            "or a list (or array) of those"
        )
    if isinstance(ground_truth, Sequence) and not isinstance(ground_truth, (str, bytes)):
        return [_one_truth(g) for g in ground_truth]
    return [_one_truth(ground_truth)]


def token_f1(prediction: str, ground_truth: GroundTruth) -> float:
    """Best token F1 over the ground truths (yes/no/noanswer must match exactly, as in SQuAD)."""
    best = 0.0
    pred = normalize_answer(prediction)
    for truth in ground_truths(ground_truth):
        gold = normalize_answer(truth)
        if (pred in _SPECIAL or gold in _SPECIAL) and pred != gold:
            continue
        pred_tokens, gold_tokens = pred.split(), gold.split()
        same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if same == 0:
            continue
        precision, recall = same / len(pred_tokens), same / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def exact_match(prediction: str, ground_truth: GroundTruth) -> float:
    """1.0 if the normalised prediction equals any normalised ground truth."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(t) for t in ground_truths(ground_truth)))


class _QuietTimeoutNotice(logging.Filter):
    """math-verify warns on every call made without its signal-based timeout, which only works in
    the main thread; off the main thread we call it without one on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def math_equal(prediction: str, ground_truth: GroundTruth) -> float:
    """1.0 if the prediction is mathematically equal to a ground truth (math-verify: LaTeX or plain
    expressions, fractions vs decimals, sets, intervals, equivalent expressions)."""
    try:
        import math_verify
    except ImportError as exc:  # say how to get it, rather than scoring everything 0
        raise ImportError("the 'math' reward needs math-verify: pip install math-verify") from exc
    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietTimeoutNotice) for f in logger.filters):
            logger.addFilter(_QuietTimeoutNotice())
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    pred = math_verify.parse(f"${prediction}$", parsing_timeout=timeout)
    if not pred:
        return 0.0
    for truth in ground_truths(ground_truth):
        gold = math_verify.parse(f"${truth}$", parsing_timeout=timeout)
        if gold and math_verify.verify(gold, pred, timeout_seconds=timeout):
            return 1.0
    return 0.0


# -- the reward -----------------------------------------------------------------------------


def gated_score(
    response: str,
    ground_truth: GroundTruth,
    compare: Callable[[str, GroundTruth], float],
    eos_token: Optional[str] = None,
    tool_bonus: float = 0.1,
    tags: ProtocolConfig = DEFAULT_TAGS,
) -> RewardResult:
    """The reference's pipeline with any answer comparison: format gate (-1), last ``\\boxed{}``
    of the answer (-1 if missing), ``compare``, and ``tool_bonus`` when the score is positive and
    every tool was called."""
    valid, reason = validate_format(response, tags)
    if not valid:
        return RewardResult(-1.0, f"bad format: {reason}")
    if eos_token and response.endswith(eos_token):
        response = response[: -len(eos_token)]
    answer_part = extract_answer(response, tags)
    if answer_part is None:
        return RewardResult(-1.0, "cannot extract the answer")
    try:
        answer = unbox(last_boxed(answer_part))
    except ValueError as exc:
        return RewardResult(-1.0, f"bad format: {exc}")
    correct = float(compare(answer, ground_truth))
    used_all = all(tags.close_tag(n) in response for n in tags.tool_names)
    if correct > 0 and used_all:
        return RewardResult(correct + tool_bonus, "correct, and called every tool", answer, correct)
    if correct > 0:
        return RewardResult(correct, "correct", answer, correct)
    return RewardResult(0.0, "wrong answer, good format", answer, correct)


RewardFn = Callable[..., RewardResult]
_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn, *, replace: bool = False) -> None:
    """Make ``fn(response, ground_truth, **extra) -> RewardResult`` available as ``name``."""
    if name in _REWARDS and not replace:
        raise ValueError(f"a reward named {name!r} is already registered; pass replace=True to swap it")
    _REWARDS[name] = fn


def reward_names() -> list[str]:
    """The names of every registered reward, sorted."""
    return sorted(_REWARDS)


def get_reward(name: str) -> RewardFn:
    if name not in _REWARDS:
        raise KeyError(f"no reward named {name!r}; registered: {', '.join(sorted(_REWARDS))}")
    return _REWARDS[name]


register_reward("arpo_f1", lambda r, g, **kw: gated_score(r, g, token_f1, **kw))
register_reward("exact_match", lambda r, g, **kw: gated_score(r, g, exact_match, **kw))
register_reward("math", lambda r, g, **kw: gated_score(r, g, math_equal, **kw))


@dataclass
class RewardConfig:
    """Which reward each ``data_source`` gets; unlisted sources get ``default``."""

    default: str = "arpo_f1"
    by_data_source: Mapping[str, str] = field(default_factory=dict)
    tool_bonus: float = 0.1

    def __post_init__(self):
        for name in (self.default, *self.by_data_source.values()):
            get_reward(name)  # fail at start-up, not at the first reward of that source


def compute_reward(
    data_source: str,
    response: str,
    ground_truth: GroundTruth,
    config: Optional[RewardConfig] = None,
    eos_token: Optional[str] = None,
) -> RewardResult:
    """Score one finished trajectory with the reward chosen for its ``data_source``
    (default config: the reference's F1 scoring for every source).

    ``ground_truth``: a string or a number, or a sequence of those; a numpy array reaches the
    reward as a list of Python values. An empty sequence is no answer at all: every prediction
    is wrong (0 for a well-formed response, -1 for a malformed one). A dict or a set raises
    TypeError."""
    config = config or RewardConfig()
    answers = ground_truths(ground_truth)  # a bad type fails here, whichever reward is chosen
    if _is_array(ground_truth):  # every reward then sees plain Python values
        ground_truth = answers
    fn = get_reward(config.by_data_source.get(data_source, config.default))
    return fn(response, ground_truth, eos_token=eos_token, tool_bonus=config.tool_bonus)

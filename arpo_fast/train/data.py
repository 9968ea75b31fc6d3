"""Training prompts: read and check a JSONL file (or the demo's problems), tokenise, order per step.

A row is ``{"prompt": str or [{"role": ..., "content": ...}, ...], "ground_truth": str or [str],
"data_source": str (optional)}``; ``data_source`` picks the reward (``rollout/rewards.py``). Chat
messages go through the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Union

Prompt = Union[str, list]


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    ground_truth: Union[str, list]
    data_source: str


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                 and isinstance(m.get("role"), str) for m in prompt):
            return "'prompt' as a list must hold {role, content} string objects"
    elif not isinstance(prompt, str) or not prompt:
        return "'prompt' must be a non-empty string or a list of chat messages"
    truth = row.get("ground_truth")
    if not (isinstance(truth, str) or (isinstance(truth, list) and truth
                                       and all(isinstance(t, str) for t in truth))):
        return "'ground_truth' must be a string or a non-empty list of strings"
    if not isinstance(row.get("data_source", ""), str):
        return "'data_source' must be a string"
    return None


def read_rows(path: str) -> list[dict]:
    """The rows of a JSONL file (blank lines skipped); a bad line raises ValueError naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            problem = _row_problem(row)
            if problem:
                raise ValueError(f"{path}:{number}: {problem}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return rows


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, list):
        if getattr(tokenizer, "chat_template", None):
            # rendered to text, then encoded without added specials: the template writes any BOS
            # itself, and the return type of tokenize=True differs between transformers versions
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            return list(tokenizer.encode(text, add_special_tokens=False))
        prompt = "\n".join(m["content"] for m in prompt) + "\n"
    return list(tokenizer.encode(prompt))


def load_examples(source: str, tokenizer, max_prompt_tokens: int | None = None) -> list[Example]:
    """``source``: 'demo' or a JSONL path. Prompts longer than ``max_prompt_tokens`` are an error."""
    from arpo_fast.train.demo import demo_problems

    rows = demo_problems() if source == "demo" else read_rows(source)
    examples = []
    for number, row in enumerate(rows, 1):
        ids = encode_prompt(tokenizer, row["prompt"])
        if not ids:
            raise ValueError(f"{source}: example {number} encodes to no tokens")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise ValueError(f"{source}: example {number} has {len(ids)} prompt tokens, more than "
                             f"the model's {max_prompt_tokens}")
        examples.append(Example(ids, row["ground_truth"], row.get("data_source", "default")))
    return examples


def step_batch(n_examples: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the examples for training step ``step``: epochs of seeded shuffles, in order, so a
    resumed run sees what an uninterrupted one would."""
    out, start = [], step * per_step
    for k in range(start, start + per_step):
        epoch, offset = divmod(k, n_examples)
        order = list(range(n_examples))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[offset])
    return out

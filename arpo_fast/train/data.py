"""Training and held-out prompts: read and check a JSONL or Parquet file (or the demo's problems),
tokenise, order per step.

A row is ``{"prompt": str or [{"role": ..., "content": ...}, ...], "ground_truth": str or [str],
"data_source": str (optional)}``; ``data_source``, or the column ``--reward-key`` names (such as
``ability``), picks the reward (``rollout/rewards.py``). Chat messages go through the tokenizer's
chat template when it has one. The reference's RL files load as they are: the ground truth may sit
in ``reward_model.ground_truth``, other columns (``extra_info``, ``ability``) are read only as a
reward key, arrays (numpy, from pandas) become lists, and a ``\\boxed`` stored as a backspace and
"oxed" (``"\\boxed"`` written into JSON unescaped) is repaired.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from arpo_fast.train.demo import is_demo

Prompt = Union[str, list]
log = logging.getLogger("arpo_fast.train.data")

PARQUET_MAGIC = b"PAR1"
BROKEN_BOXED = "\x08oxed"  # "\b" in JSON is a backspace


@dataclass(frozen=True)
class Example:
    prompt_ids: list[int]
    ground_truth: Union[str, list]
    data_source: str
    """The value of the row's ``--reward-key`` column (``data_source`` by default): it picks the
    reward."""


def _plain(value: Any) -> Any:
    """Numpy arrays (and their scalars) as Python lists (and scalars), inside dicts and lists too."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def normalize_row(row: Any) -> Any:
    """A row in the shape the trainer reads: the ground truth taken from ``reward_model`` when the
    row has none of its own, arrays as lists, a missing or null ``data_source`` dropped."""
    if not isinstance(row, dict):
        return row
    row = {k: _plain(v) for k, v in row.items()}
    reward_model = row.get("reward_model")
    if row.get("ground_truth") is None and isinstance(reward_model, dict) and "ground_truth" in reward_model:
        row["ground_truth"] = reward_model["ground_truth"]
    if row.get("data_source") is None:
        row.pop("data_source", None)
    return row


def repair_boxed(row: dict) -> bool:
    """Turn backspace + "oxed" back into ``\\boxed`` in the prompt; True if anything changed."""
    prompt = row["prompt"]
    if isinstance(prompt, str):
        row["prompt"] = prompt.replace(BROKEN_BOXED, "\\boxed")
        return row["prompt"] != prompt
    changed = False
    for message in prompt:
        fixed = message["content"].replace(BROKEN_BOXED, "\\boxed")
        changed |= fixed != message["content"]
        message["content"] = fixed
    return changed


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
            for m in prompt
        ):
            return "'prompt' as a list must hold {role, content} string objects"
    elif not isinstance(prompt, str) or not prompt:
        return "'prompt' must be a non-empty string or a list of chat messages"
    truth = row.get("ground_truth")
    if not (
        isinstance(truth, str)
        or (isinstance(truth, list) and truth and all(isinstance(t, str) for t in truth))
    ):
        return (
            "'ground_truth' (or 'reward_model.ground_truth') must be a string or a non-empty list of strings"
        )
    if not isinstance(row.get("data_source", ""), str):
        return "'data_source' must be a string"
    return None


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for each non-blank line; where is ``path:line``."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: neither a JSONL file (it is not UTF-8 text) nor a Parquet file") from None
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for each row; where is ``path: row N``. A file without the prompt and ground
    truth columns is an error naming the columns it has."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot read it as Parquet ({first})") from None
    names = table.column_names
    truth_in_reward_model = (
        "reward_model" in names
        and pa.types.is_struct(table.schema.field("reward_model").type)
        and table.schema.field("reward_model").type.get_field_index("ground_truth") >= 0
    )
    missing = [
        c
        for c, ok in (
            ("prompt", "prompt" in names),
            ("ground_truth", "ground_truth" in names or truth_in_reward_model),
        )
        if not ok
    ]
    if missing:
        raise ValueError(
            f"{path}: no {' or '.join(repr(m) for m in missing)} column (nor "
            f"reward_model.ground_truth); its columns: {', '.join(names)}"
        )
    return [(f"{path}: row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def read_rows(path: str) -> list[dict]:
    """The checked rows of a JSONL or Parquet file (told apart by Parquet's magic bytes); any
    problem raises ValueError naming the file, and the line or row."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"{path}: no such file")
    if file.is_dir():
        raise ValueError(f"{path}: is a directory, not a JSONL or Parquet file")
    with open(file, "rb") as f:
        parquet = f.read(len(PARQUET_MAGIC)) == PARQUET_MAGIC
    rows, repaired = [], 0
    for where, row in (_parquet_rows if parquet else _jsonl_rows)(file):
        row = normalize_row(row)
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"{where}: {problem}")
        repaired += repair_boxed(row)
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    if repaired:
        log.info(
            "%s: repaired \\boxed (stored as a backspace and 'oxed') in %d of %d rows",
            path,
            repaired,
            len(rows),
        )
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


def source_rows(source: str, flag: str) -> list[dict] | None:
    """The checked rows of the file that ``flag`` (e.g. ``--data``) names, read before anything
    slow (loading or warm-starting a model) so that a bad file fails at once; None for 'demo'."""
    if is_demo(source):
        return None
    try:
        return read_rows(source)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def fixed_subset(n: int, limit: int | None) -> list[int]:
    """Indices of ``limit`` of ``n`` items drawn once with a fixed seed (all of them when ``limit``
    is None or not below ``n``), in order: the same subset at every evaluation and in every run."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(0).sample(range(n), limit))


def _reward_value(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return "default"
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}: its {key!r} is not a single value (--reward-key {key})")
    return str(value)


def load_examples(
    source: str,
    tokenizer,
    max_prompt_tokens: int | None = None,
    demo_split: str = "train",
    rows: list[dict] | None = None,
    *,
    reward_key: str = "data_source",
    flag: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """``source``: 'demo' (the demo's ``demo_split`` problems) or a JSONL or Parquet path, whose
    ``rows`` (``read_rows``) may be given already read. Prompts longer than ``max_prompt_tokens``
    are an error naming ``flag`` (e.g. ``--data``) when given. Each example's reward is picked by
    its ``reward_key`` column (a row without it: 'default'); ``limit``: only a fixed subset of that
    many rows (:func:`fixed_subset`)."""
    from arpo_fast.train.demo import demo_problems

    where = f"{flag}: {source}" if flag else source
    if rows is None:
        rows = demo_problems(split=demo_split) if is_demo(source) else read_rows(source)
    if reward_key != "data_source" and not any(reward_key in row for row in rows):
        columns = ", ".join(dict.fromkeys(k for row in rows[:100] for k in row))
        raise ValueError(f"--reward-key {reward_key}: no row of {where} has it; its columns: {columns}")
    examples = []
    for number in fixed_subset(len(rows), limit):
        row = rows[number]
        ids = encode_prompt(tokenizer, row["prompt"])
        if not ids:
            raise ValueError(f"{where}: example {number + 1} encodes to no tokens")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise ValueError(
                f"{where}: example {number + 1} has {len(ids)} prompt tokens, more than "
                f"the model's {max_prompt_tokens} (its context less one token to write)"
            )
        source_value = _reward_value(row, reward_key, f"{where}: example {number + 1}")
        examples.append(Example(ids, row["ground_truth"], source_value))
    return examples


def prepare(cfg, tokenizer, context: int | None) -> tuple[list[Example], list[Example]]:
    """The run's training and held-out examples, read, checked and tokenised before any weights
    load: a bad file, a prompt longer than the model's ``context`` (its ``max_position_embeddings``;
    None: unchecked), a ``--reward-key`` column that no row has, or a ``--reward-by-source`` that
    matches no example fails here with one line naming its flag."""
    longest = None if context is None else context - 1
    rows = source_rows(cfg.data, "--data")
    key = cfg.reward_key
    examples = load_examples(cfg.data, tokenizer, longest, rows=rows, reward_key=key, flag="--data")
    held_out = []
    if cfg.eval_data != "none":
        eval_rows = source_rows(cfg.eval_data, "--eval-data")
        held_out = load_examples(
            cfg.eval_data,
            tokenizer,
            longest,
            demo_split="heldout",
            rows=eval_rows,
            reward_key=key,
            flag="--eval-data",
            limit=cfg.eval_limit,
        )
    _check_reward_sources(cfg, examples + held_out)
    return examples, held_out


def test_examples(cfg, tokenizer, context: int | None) -> list[Example]:
    """The run's test examples (``--test-data``; the demo's ``test`` split for 'demo'), read and
    checked as :func:`prepare` reads the held-out ones; none for 'none'."""
    if cfg.test_data == "none":
        return []
    return load_examples(
        cfg.test_data,
        tokenizer,
        None if context is None else context - 1,
        demo_split="test",
        rows=source_rows(cfg.test_data, "--test-data"),
        reward_key=cfg.reward_key,
        flag="--test-data",
    )


def _check_reward_sources(cfg, examples: list[Example]) -> None:
    """Every ``--reward-by-source`` entry should match some example: none matching is an error (the
    map would do nothing: a wrong --reward-key, or misspelt values), some not matching a warning."""
    if not cfg.reward_by_source:
        return
    mapped = set(json.loads(cfg.reward_by_source))
    seen = {e.data_source for e in examples}
    missing = sorted(mapped - seen)
    if not missing:
        return
    values = ", ".join(sorted(seen)[:20])
    if len(missing) == len(mapped):
        raise ValueError(
            f"--reward-by-source: no example has {cfg.reward_key} {' or '.join(map(repr, missing))} "
            f"(--reward-key {cfg.reward_key}; the data's values: {values})"
        )
    log.warning("--reward-by-source: no example has %s %s", cfg.reward_key, ", ".join(map(repr, missing)))


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

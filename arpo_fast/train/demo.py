"""The built-in default job: multiplying numbers too large to do in one's head, with a python tool.

Nothing is downloaded, so ``python -m arpo_fast.train`` runs on any machine, CPU included. The demo
is only a model, a tokenizer, data and default settings; the trainer runs it as any other job.

* **Task.** ``what is a * b?`` with a, b of three digits. A model of this size cannot multiply in
  its head; it can copy the numbers into ``<python>print(a * b)</python>`` and the result into
  ``\\boxed{}``. The reward is the reference's (``arpo_f1``: -1 for a bad format, else 1 for the
  exact product and 0 otherwise, a number being one word).
* **Tokenizer.** A byte-level BPE trained here on the demo's texts, splitting text as Qwen2's
  tokenizer does, in which every digit and every ``<tag>``/``</tag>`` is one token: copying a number
  is copying tokens one for one.
* **Model.** A random Qwen2 of 3 layers, hidden 128 (about 0.64M parameters), fp32 on the CPU.
* **Warm start.** ARPO starts from a supervised model; the demo's is trained for a minute and a
  half on solutions of other problems (``warm_start``). First all of them call python: the model
  learns the call and the copy of its result. Then a mix in which only ``TOOL_SHARE`` of them do and
  the rest answer straight away with a guess (whose digits are not trained on). The warm-started
  model prefers to guess: its greedy answers are wrong, while a sampled answer calls python about
  one time in three and is then nearly always right. What RL has to learn is that the tool pays;
  the steps show the tool calls per trajectory rising with the reward, and the held-out
  evaluations the accuracy.
* **Splits.** The warm-start, training, held-out and test problems are disjoint (``demo_splits``);
  the 128 held-out ones (``eval``) are evaluated at step 0 and every few steps, greedy and sampled.
  They chose the demo's learning rate and warm-start mix, so they are a validation set: the 128
  test problems, drawn with a seed of their own, are evaluated once, after the last step.
* **Settings.** The demo's steps are ``TrainConfig``'s default; its learning rate ``LR``, prompts
  per step ``PROMPTS_PER_STEP``, response length ``RESPONSE_TOKENS`` and mini-batches of
  ``MINI_BATCH_PROMPTS`` prompts apply to ``--model demo`` only (a real model gets the
  reference's). Everything else is the
  reference's (16 trajectories per prompt, 8 started, 2 paths per branch, tau 0.5, beta 0.2,
  temperature 1, clip 0.2/0.2, dual clip 3).
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable
from typing import Optional

from arpo_fast.rollout.protocol import format_result

SYSTEM = "Solve it. Run Python inside <python></python> if you like; answer as <answer>\\boxed{...}</answer>."
"""The instruction in front of every demo problem."""

DEMO = "demo"
"""The name that, as ``--model``, ``--data`` or ``--eval-data``, stands for the demo's part."""
SOURCE = "demo_arithmetic"
TOOL_SHARE = 0.3
"""Share of the warm start's mixed solutions that call python (the rest answer straight away)."""
TOOL_FIRST = 0.6
"""Share of the warm start's steps, at its beginning, on solutions that all call python."""
SIZES = {"heldout": 128, "train": 1024, "warm": 4096}
"""Problems per split; the splits never share a problem."""
TEST_SIZE = 128
"""Problems of the ``test`` split: drawn with a seed of their own after the others, disjoint from
them, and evaluated once at the end of a run (the held-out ones chose the demo's settings)."""
MINI_BATCH_PROMPTS = 2
"""The demo's prompts per optimizer step: 4 steps of its 8 prompts, the reference's shape (128
prompts in 8 steps of 16) at the demo's size, so that the ratio and its clip come into play."""
LR = 1e-4
"""The demo's learning rate (``TrainConfig.lr`` resolves to it for ``--model demo`` only): a
0.6M-parameter model barely moves at the reference's 1e-6."""
LORA_LR = 1e-3
"""The demo's learning rate with ``--lora-rank`` (10x ``LR``, as LoRA is commonly tuned)."""
PROMPTS_PER_STEP = 8
"""The demo's prompts per step (``--prompts-per-step auto`` with ``--model demo``)."""
RESPONSE_TOKENS = 64
"""The demo's response length (``--max-response-tokens auto`` with ``--model demo``): its solutions
are short."""


TOOL_THOUGHT = "{a} * {b} is too big for my head; run it."
GUESS_THOUGHT = "{a} * {b}: a guess will do."
"""The thoughts of the two kinds of warm-start solution. Both restate the problem: copying the
numbers out of the prompt is practised by every solution, not only by the share that calls python."""


def is_demo(source: str) -> bool:
    """Whether a ``--model``, ``--data`` or ``--eval-data`` value names the demo's part."""
    return source == DEMO


def threads(load: float | None = None, cores: int | None = None) -> int:
    """Torch's intra-op threads for the demo model (``--cpu-threads auto``): the cores that other
    work leaves free (``cores`` less the 1-minute ``load`` average, read now by default), at least
    one. Its matrices (hidden 128) gain little from threads, and on a busy machine a thread that
    waits for a core holds up every step: benchmarks/RESULTS.md, "Training demo"."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this system: assume none
            load = 0.0
    return max(1, min(cores, round(cores - load)))


def demo_splits(seed: int = 0) -> dict[str, list[tuple[int, int]]]:
    """Disjoint lists of (a, b) operand pairs per split (``SIZES``), drawn with ``seed``. The demo
    always uses seed 0, whatever the run's seed, so its held-out problems stay held out."""
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    while len(pairs) < sum(SIZES.values()):
        pair = (rng.randint(100, 999), rng.randint(100, 999))
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    out, start = {}, 0
    for name, n in SIZES.items():
        out[name], start = pairs[start : start + n], start + n
    rng = random.Random(f"test-{seed}")  # another stream: the other splits stay as they were
    out["test"] = []
    while len(out["test"]) < TEST_SIZE:
        pair = (rng.randint(100, 999), rng.randint(100, 999))
        if pair not in seen:
            seen.add(pair)
            out["test"].append(pair)
    return out


def _prompt(a: int, b: int) -> str:
    return f"{SYSTEM}\nProblem: what is {a} * {b}?\n"


def demo_problems(n: int | None = None, seed: int = 0, split: str = "train") -> list[dict]:
    """The first ``n`` (default all) problems of ``split`` (of ``demo_splits(seed)``) as dataset
    rows: prompt text, ground truth, data source."""
    pairs = demo_splits(seed)[split][:n]
    return [{"prompt": _prompt(a, b), "ground_truth": str(a * b), "data_source": SOURCE} for a, b in pairs]


def _solution(a: int, b: int, guess: int | None = None) -> list[str]:
    """A well-formed solution as pieces encoded apart, alternately trained on and not: text the
    model writes, the tool result exactly as the rollout appends it (what print() writes, newline
    included), text. With ``guess`` the solution answers that number straight away, without the
    tool; the guessed digits are the piece not trained on (see ``_warm_texts``)."""
    if guess is not None:
        return [f"<think>{GUESS_THOUGHT.format(a=a, b=b)}</think><answer>\\boxed{{", str(guess), "}</answer>"]
    return [
        f"<think>{TOOL_THOUGHT.format(a=a, b=b)}</think><python>print({a} * {b})</python>",
        format_result(f"{a * b}\n"),
        f"<answer>\\boxed{{{a * b}}}</answer>",
    ]


def _warm_texts(seed: int) -> list[tuple[str, list[str]]]:
    """(prompt, solution pieces) for every warm-start problem: ``TOOL_SHARE`` of them call python,
    the others guess a number with as many digits as the product (drawn with ``seed``). A guess is
    about never right and its digits are noise with nothing to learn: they are left out of the
    loss, so that they do not teach the model that whatever follows ``\\boxed{`` is noise."""
    rng = random.Random(seed + 1)
    texts = []
    for a, b in demo_splits()["warm"]:
        digits = len(str(a * b))
        guess = None if rng.random() < TOOL_SHARE else rng.randint(10 ** (digits - 1), 10**digits - 1)
        texts.append((_prompt(a, b), _solution(a, b, guess)))
    return texts


TAGS = tuple(f"<{c}{t}>" for t in ("think", "python", "result", "answer") for c in ("", "/"))
"""The protocol's tags: each is one token of the demo's tokenizer."""


def demo_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on the demo's texts that splits text as Qwen2's tokenizer does
    (Qwen2's pre-tokenizer pattern: each digit a piece of its own, so each digit is one token), the
    tags (``TAGS``) added as ordinary tokens (decoding keeps them), EOS ``<eos>``. Being a Qwen2
    tokenizer in all but its vocabulary, it loads as itself with ``AutoTokenizer`` from a
    checkpoint's model folder, whose config.json says Qwen2."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = ["".join([p, *s]) for p, s in _warm_texts(0)[:512]]
    texts += ["".join([_prompt(100, 200), *_solution(100, 200, guess)]) for guess in (None, 20000)]
    tags = re.compile("|".join(map(re.escape, TAGS)))
    tok.train_from_iterator((piece for text in texts for piece in tags.split(text)), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    # unk: Qwen2Tokenizer would otherwise add one of its own (a BPE over bytes never needs it)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<eos>"
    )


QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The pre-tokenizer pattern of Qwen2's tokenizer (transformers' ``Qwen2Tokenizer``), which
``AutoTokenizer`` applies to any tokenizer saved beside a Qwen2 config.json."""


def demo_config(tokenizer, layers: int = 3, hidden: int = 128):
    """The demo model's Qwen2 config: 3 layers, hidden 128, a context of 256 positions."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def demo_model(tokenizer, seed: int = 0, layers: int = 3, hidden: int = 128):
    """A random Qwen2 causal LM sized for the CPU (fp32), its vocabulary the tokenizer's."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(demo_config(tokenizer, layers, hidden))


def move_model(model, device, dtype):
    """``model.to(device, dtype)`` with the rotary frequencies kept in fp32, as ``from_pretrained``
    leaves them: cast to bf16 they would move every position's angle, and a checkpoint of the model
    would then not run the same as the model itself."""
    keep = {name: buf.float() for name, buf in model.named_buffers() if name.endswith("inv_freq")}
    model.to(device=device, dtype=dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buf.to(device))
    return model


def _batch(rows, pad_id: int):
    """Right-padded input ids, labels (-100 outside what the model writes) and attention mask, from
    (prompt ids, solution ids, solution loss mask) rows."""
    import torch

    width = max(len(p) + len(s) for p, s, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), -100, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, (prompt, solution, mask) in enumerate(rows):
        end = len(prompt) + len(solution)
        ids[r, :end] = torch.tensor(prompt + solution)
        labels[r, len(prompt) : end] = torch.tensor([t if m else -100 for t, m in zip(solution, mask)])
        attention[r, :end] = 1
    return ids, labels, attention


def _encode_solution(tokenizer, pieces: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of a solution's pieces and EOS, with loss mask 0 on the odd pieces (a tool result,
    or a guess)."""
    ids, mask = [], []
    for k, piece in enumerate(pieces):
        piece_ids = tokenizer.encode(piece)
        ids += piece_ids
        mask += [1 - k % 2] * len(piece_ids)
    return ids + [tokenizer.eos_token_id], mask + [1]


def warm_start(
    model,
    tokenizer,
    steps: int = 600,
    lr: float = 3e-3,
    batch: int = 32,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> float:
    """Supervised steps on solutions of the warm-start split, the loss on what the model writes and
    EOS (not on prompts or tool results, as in the RL update), with a cosine learning-rate decay.
    The first ``TOOL_FIRST`` of the steps see only solutions that call python (the model learns the
    call and the copy of its result), the rest the mix of ``_warm_texts`` (it learns to prefer a
    guess). Returns the last step's loss; ``log`` gets a progress line ten times. The model is left
    in eval mode."""
    import torch

    def encode(texts):
        return [(tokenizer.encode(prompt), *_encode_solution(tokenizer, pieces)) for prompt, pieces in texts]

    mix = encode(_warm_texts(seed))
    tool_only = encode((_prompt(a, b), _solution(a, b)) for a, b in demo_splits()["warm"])
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
    rng = random.Random(seed)
    loss = torch.tensor(float("nan"))
    model.train()
    for step in range(1, steps + 1):
        rows = tool_only if step <= TOOL_FIRST * steps else mix
        ids, labels, attention = _batch(
            [rows[rng.randrange(len(rows))] for _ in range(batch)], tokenizer.pad_token_id
        )
        loss = model(
            input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None and step % max(steps // 10, 1) == 0:
            log(f"demo warm start: {step}/{steps} supervised steps, loss {float(loss.detach()):.3f}")
    model.eval()
    return float(loss.detach())

"""The built-in default job: a tiny random Qwen2 model, a tokenizer trained here, arithmetic problems.

Nothing is downloaded, so ``python -m arpo_fast.train`` runs on any machine, CPU included, in about
a minute. ARPO starts from a model fine-tuned on well-formed tool-using answers; the demo does the
same in miniature (``warm_start``: a few hundred supervised steps on generated solutions), so that
its rollouts call the python tool, read real results, branch and earn rewards that differ (-1 for a
broken format, 0 for a wrong answer, 1 for a right one). It shows every stage of a training step at
work; a model this small learns little arithmetic. Real runs pass ``--model`` (a local Hugging Face
directory) and ``--data`` (JSONL).
"""

from __future__ import annotations

import random

from arpo_fast.rollout.protocol import format_result

SYSTEM = ("Solve the problem. You may run Python between <python> and </python>; its output comes "
          "back between <result> and </result>. Think between <think> and </think>, then give the "
          "final answer as <answer>\\boxed{...}</answer>.")
"""The instruction in front of every demo problem."""

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def demo_problems(n: int = 64, seed: int = 0) -> list[dict]:
    """``n`` arithmetic problems as dataset rows: prompt text, ground truth, data source."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(2, 99), rng.randint(2, 99), rng.choice(sorted(_OPS))
        rows.append({"prompt": f"{SYSTEM}\nProblem: what is {a} {op} {b}?\n",
                     "ground_truth": str(_OPS[op](a, b)), "data_source": "demo_arithmetic"})
    return rows


def _solutions(n: int = 200, seed: int = 1) -> list[tuple[str, str, str, str]]:
    """(prompt, text before the tool result, the result, text after it): well-formed solutions of
    problems other than the training ones, the result exactly as the rollout appends it."""
    out = []
    for row in demo_problems(n, seed=seed):
        question = row["prompt"].rsplit("Problem: what is ", 1)[1].rstrip("?\n")
        truth = row["ground_truth"]
        out.append((row["prompt"], f"<think>I will compute {question}.</think><python>print({question})</python>",
                    format_result(truth + "\n"),  # what print() writes, newline included
                    f"<answer>\\boxed{{{truth}}}</answer>"))
    return out


def demo_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the demo's texts (any text encodes; EOS is ``<eos>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["".join(parts) for parts in _solutions()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def demo_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A random Qwen2 causal LM sized for the CPU (fp32), its vocabulary the tokenizer's."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


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


def warm_start(model, tokenizer, steps: int = 300, lr: float = 3e-3, batch: int = 16, seed: int = 0) -> float:
    """Supervised steps on (prompt, solution) pairs, the loss on solution tokens and EOS only;
    returns the last step's loss. The model is left in eval mode."""
    import torch

    # the pieces are encoded apart, as in a rollout (a result's tokens never merge with their neighbours)
    encode = tokenizer.encode
    pairs = [(encode(p), encode(before) + encode(result) + encode(after) + [tokenizer.eos_token_id])
             for p, before, result, after in _solutions()]
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        rows = [pairs[rng.randrange(len(pairs))] for _ in range(batch)]
        width = max(len(p) + len(s) for p, s in rows)
        ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.int64)
        labels = torch.full((batch, width), -100, dtype=torch.int64)
        attention = torch.zeros((batch, width), dtype=torch.int64)
        for r, (prompt, solution) in enumerate(rows):
            end = len(prompt) + len(solution)
            ids[r, :end] = torch.tensor(prompt + solution)
            labels[r, len(prompt):end] = torch.tensor(solution)
            attention[r, :end] = 1
        loss = model(input_ids=ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())

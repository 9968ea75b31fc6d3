"""Train a tool-using agent with ARPO. ``python -m arpo_fast.train --help`` lists every setting.

Each step: pick ``prompts_per_step`` prompts; roll each out as an ARPO tree of ``rollouts``
trajectories on the paged-KV engine, which runs on the model's own weights (``rollout/tree.py``);
score every trajectory (``rollout/rewards.py``); turn rewards into GRPO advantages within each
prompt's group and attribute them to tokens, soft or hard (``algo/advantages.py``); apply the clipped
policy-gradient update, token-mean over the model-written tokens (``update.py``, ``algo/loss.py``);
log; save a checkpoint. Dropout stays off (the model is in eval mode), so the rollout and the update
see the same policy.

Without arguments this is the built-in demo (``demo.py``): a tiny random model on arithmetic
problems, a minute on a CPU. A real run: ``--model DIR --data FILE.jsonl --max-response-tokens 4096``.

The optimizer (AdamW) steps fp32 master weights and writes them back into the model, so a bf16
model does not lose the reference's 1e-6 updates (``optim.py``). Known limits: there is no
reference-model KL term (the reference's coefficient is 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from arpo_fast.algo import group_advantages, shared_token_count, token_advantages
from arpo_fast.train.checkpoint import (NAMES, CheckpointError, check_checkpoint_names,
                                        find_checkpoint, save_checkpoint, validate_checkpoint)
from arpo_fast.train.config import TrainConfig, parse_config
from arpo_fast.train.data import load_examples, step_batch
from arpo_fast.engine import Engine, SamplingParams
from arpo_fast.seeds import child_seed
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.update import update
from arpo_fast.rollout import Protocol, ProtocolConfig, RewardConfig, compute_reward
from arpo_fast.rollout.rewards import response_text
from arpo_fast.rollout.tools import create_tool
from arpo_fast.rollout.tools.executor import ToolExecutor
from arpo_fast.rollout.tree import arpo_rollout

log = logging.getLogger("arpo_fast.train")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but torch sees no CUDA device")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return device, DTYPES[dtype]


def load_model(cfg: TrainConfig, checkpoint: Optional[Path], device, dtype):
    """The policy and its tokenizer: from the checkpoint when resuming, else the demo or ``--model``."""
    if checkpoint is None and cfg.model == "demo":
        from arpo_fast.train.demo import demo_model, demo_tokenizer, move_model, warm_start

        tokenizer = demo_tokenizer()
        model = move_model(demo_model(tokenizer, seed=cfg.seed), device, dtype)
        if cfg.demo_warm_start:
            t0 = time.perf_counter()
            loss = warm_start(model, tokenizer, cfg.demo_warm_start, seed=cfg.seed)
            print(f"demo warm start: {cfg.demo_warm_start} supervised steps, loss {loss:.3f}, "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
        return model.eval(), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint / "model" if checkpoint is not None else Path(cfg.model)
    if not path.is_dir():
        raise ValueError(f"--model {cfg.model!r}: not 'demo' and not a local model directory")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer" if checkpoint is not None else path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def _json_object(text: str, flag: str, shape: str) -> dict:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{flag}: not valid JSON ({exc.msg}); expected {shape}") from None
    except RecursionError:
        raise ValueError(f"{flag}: JSON nested too deeply; expected {shape}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object: {shape}")
    return value


def tool_settings(cfg: TrainConfig) -> dict:
    settings = _json_object(cfg.tool_settings, "--tool-settings", "{tool name: {setting: value}}")
    unknown = sorted(set(settings) - set(cfg.tool_names))
    if unknown:
        raise ValueError(f"--tool-settings names tools not in --tools: {', '.join(unknown)}")
    for name, value in settings.items():
        if not isinstance(value, dict):
            raise ValueError(f"--tool-settings: the settings of {name!r} must be a JSON object, got "
                             f"{json.dumps(value)[:60]}")
    return settings


def tool_executor(cfg: TrainConfig, settings: dict) -> Optional[ToolExecutor]:
    """The run's tools, each built from its ``--tool-settings``, behind one executor."""
    tools = []
    for name in cfg.tool_names:
        try:
            tools.append(create_tool(name, **settings.get(name, {})))
        except TypeError as exc:  # an unknown setting name
            raise ValueError(f"--tool-settings: {name}: {exc}") from None
    return ToolExecutor({t.name: t for t in tools}) if tools else None


def reward_config(cfg: TrainConfig) -> RewardConfig:
    by_source = _json_object(cfg.reward_by_source, "--reward-by-source", "{data_source: reward name}")
    try:
        return RewardConfig(default=cfg.reward, by_data_source=by_source)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def score(trajectories, examples, tokenizer, rewards: RewardConfig) -> list:
    """The reward of each trajectory, chosen by its example's ``data_source``, on what the model
    wrote (special tokens skipped, tool results opaque: ``rollout.rewards.response_text``)."""
    return [compute_reward(examples[t.prompt_index].data_source,
                           response_text(tokenizer, t.response_ids, t.loss_mask),
                           examples[t.prompt_index].ground_truth, rewards)
            for t in trajectories]


def step_metrics(step: int, rollout, rewards, update_metrics: dict, times: dict) -> dict:
    trajs = rollout.trajectories
    n = len(trajs)
    total, unique = shared_token_count(rollout.paths())
    return {"step": step, "reward": sum(r.score for r in rewards) / n,
            "correct": sum(r.correctness > 0 for r in rewards) / n,
            "format_ok": sum(r.score > -1 for r in rewards) / n,
            "trajectories": n, "tool_calls": rollout.stats["tool_calls"],
            "branch_points": rollout.stats["branch_points"], "fills": rollout.stats["fills"],
            "response_tokens": total, "shared_tokens": total - unique,
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in update_metrics.items()},
            **{f"{k}_s": round(v, 3) for k, v in times.items()}}


def _line(m: dict, steps: int) -> str:
    return (f"step {m['step']}/{steps}  reward {m['reward']:+.3f}  correct {m['correct']:.2f}  "
            f"format {m['format_ok']:.2f}  traj {m['trajectories']}  calls {m['tool_calls']}  "
            f"branches {m['branch_points']}  tokens {m['response_tokens']} "
            f"(shared {m['shared_tokens']})  loss {m['loss']:+.4f}  clip {m['clip_fraction']:.3f}  "
            f"grad {m['grad_norm']:.3f}  rollout {m['rollout_s']:.1f}s  update {m['update_s']:.1f}s")


@dataclass
class Run:
    """Everything a training step uses, built once by :func:`setup`."""

    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    optimizer: MasterWeights
    engine: Engine
    protocol: Protocol
    executor: Optional[ToolExecutor]
    examples: list
    rewards: RewardConfig
    start: int


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash (or blank) counts as after all."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _prepare_out(cfg: TrainConfig) -> tuple[Optional[Path], Optional[dict]]:
    """The checkpoint to resume from (with its trainer state), after checking that a fresh run would
    not overwrite an earlier one or anything else; a resumed run's metrics keep only the rows it
    does not redo. Everything is checked before anything is changed."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    metrics = out / "metrics.jsonl"
    if not cfg.resume:
        taken = [p.name for p in (metrics, *(out / n for n in NAMES)) if p.exists() or p.is_symlink()]
        if taken:
            raise ValueError(f"{out} already holds a run ({', '.join(taken)}); pass --resume true to "
                             "continue it, or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        return None, None
    checkpoint = find_checkpoint(cfg.out)
    if checkpoint is None:
        raise ValueError(f"--resume: no checkpoint in {out}")
    state = validate_checkpoint(checkpoint)
    check_checkpoint_names(out)  # the next save may rename or remove any of them
    if metrics.exists():
        rows = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                if _step_of(line) <= state["step"]]
        tmp = out / "metrics.jsonl.tmp"
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        tmp.replace(metrics)  # whole or not at all
    return checkpoint, state


def setup(cfg: TrainConfig, model=None, tokenizer=None) -> Run:
    """Check the settings, load (or resume) the model, and build the engine, tools and optimizer.
    ``model`` and ``tokenizer``: train these instead of loading ``cfg.model`` (not with resume)."""
    if (model is None) != (tokenizer is None):
        raise ValueError("setup: pass both model and tokenizer, or neither")
    if model is not None and cfg.resume:
        raise ValueError("setup: resume loads the checkpoint's model; do not pass one")
    rewards = reward_config(cfg)  # names and JSON settings fail here, before anything is loaded
    settings = tool_settings(cfg)
    checkpoint, state = _prepare_out(cfg)
    device, dtype = resolve_device(cfg)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_model(cfg, checkpoint, device, dtype)
    examples = load_examples(cfg.data, tokenizer, model.config.max_position_embeddings - 1)
    optimizer = MasterWeights(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log.info("resumed from %s after step %d", checkpoint, start)
    log.info("update: %s", cfg.update.describe(device))
    kv = {"kv_memory": cfg.kv_memory_mb << 20} if cfg.kv_memory_mb else {}
    engine = Engine(model, tokenizer=tokenizer, on_pool_exhausted="preempt", **kv)
    executor = tool_executor(cfg, settings)
    # Tags are the tools' own names (http_search answers <search>); the usual tags stay recognised,
    # so a call to a tool this run lacks reads back an error instead of passing as plain text.
    names = tuple(executor.tools) if executor is not None else ()
    tags = ProtocolConfig(tool_names=tuple(dict.fromkeys(ProtocolConfig().tool_names + names)),
                          max_calls=cfg.max_calls, stop_at_answer=cfg.stop_at_answer)
    protocol = Protocol(tokenizer, tags, eos_token_ids=engine.eos_token_ids, available_tools=names)
    return Run(cfg, model, tokenizer, optimizer, engine, protocol, executor, examples, rewards, start)


def train_step(run: Run, step: int) -> dict:
    """One step (0-based): rollout -> reward -> advantage -> update; returns its metrics."""
    cfg = run.cfg
    batch = [run.examples[i] for i in step_batch(len(run.examples), cfg.prompts_per_step, step, cfg.seed)]
    sampling = SamplingParams(cfg.temperature, top_k=cfg.top_k or None,
                              top_p=cfg.top_p if cfg.top_p < 1 else None)
    t0 = time.perf_counter()
    with torch.no_grad():
        rollout = arpo_rollout(run.engine, run.protocol, [e.prompt_ids for e in batch], cfg.rollout, sampling,
                               run.executor, seed=child_seed(cfg.seed, step))
    if run.executor is not None:
        run.executor.new_step()
    t1 = time.perf_counter()
    rewards = score(rollout.trajectories, batch, run.tokenizer, run.rewards)
    seq_adv = group_advantages([r.score for r in rewards], [t.prompt_index for t in rollout.trajectories])
    advantages = token_advantages(seq_adv, rollout.paths(), cfg.advantage)
    t2 = time.perf_counter()
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    metrics = update(run.model, run.optimizer, rollout.trajectories, advantages, cfg.update, pad_id,
                     cfg.temperature, node_tokens=rollout.node_tokens)
    t3 = time.perf_counter()
    return step_metrics(step + 1, rollout, rewards, metrics,
                        {"rollout": t1 - t0, "reward": t2 - t1, "update": t3 - t2})


def train(cfg: TrainConfig, model=None, tokenizer=None) -> list[dict]:
    """Set up (see :func:`setup`) and run the training loop; returns each step's metrics."""
    return fit(setup(cfg, model, tokenizer))


def fit(run: Run) -> list[dict]:
    """Steps from ``run.start`` to ``cfg.steps``; each one's metrics are printed, appended to
    ``out/metrics.jsonl`` and returned; checkpoints every ``save_every`` steps and at the end."""
    cfg = run.cfg
    history = []
    try:
        for step in range(run.start, cfg.steps):
            row = train_step(run, step)
            history.append(row)
            print(_line(row, cfg.steps), flush=True)
            with open(Path(cfg.out) / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(cfg.out, run.model, run.tokenizer, run.optimizer, step + 1,
                                dataclasses.asdict(cfg))
    finally:
        if run.executor is not None:
            run.executor.shutdown(wait=False)
    return history


def describe_error(exc: BaseException) -> str:
    """One line for the user: the message, or for a failed file operation the path and the reason
    (``OSError.args[0]`` alone is only the errno)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{where}: {exc.strerror}" if where else exc.strerror
    text = str(exc.args[0]) if exc.args else str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("config: " + json.dumps(dataclasses.asdict(cfg)), flush=True)
    try:
        run = setup(cfg)
    except (ValueError, KeyError, TypeError, CheckpointError, OSError) as exc:  # bad settings, data, files
        print(f"arpo_fast.train: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    fit(run)
    print(f"checkpoint and metrics in {cfg.out}", flush=True)
    return 0

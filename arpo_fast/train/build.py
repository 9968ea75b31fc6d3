"""From settings to the objects a run uses: the device and dtype, the model and tokenizer, the
tools and their executor, the rewards and the tool-call protocol. Every bad setting fails here with
a one-line message naming its flag, before anything is written."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from arpo_fast.rollout import Protocol, ProtocolConfig, RewardConfig
from arpo_fast.rollout.tools import check_tool_settings, create_tool, tool_names
from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor
from arpo_fast.rollout.tools.validate import close_match, load_json, shown
from arpo_fast.train.config import TrainConfig

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


def check_model_source(cfg: TrainConfig, resuming: bool) -> None:
    """Fail at once, naming the flag, on a ``--model`` or ``--tokenizer`` that cannot be what it
    should be (checked before anything slow or written). A resumed run loads its checkpoint's, and
    ``--model`` again only as the KL reference (``--kl-coef``)."""
    if resuming and not cfg.update.kl_coef:
        return
    if cfg.model == "demo":
        if cfg.tokenizer and not resuming:
            raise ValueError(
                "--tokenizer: the demo model builds its own tokenizer; --tokenizer goes with --model DIR"
            )
        return
    path = Path(cfg.model)
    if not path.is_dir():
        raise ValueError(f"--model {cfg.model!r}: not 'demo' and not a local model directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {cfg.model}: no config.json there; not a Hugging Face model directory")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        raise ValueError(f"--tokenizer {cfg.tokenizer!r}: not a local tokenizer directory")


def _loaded(what: str, load):
    """``load()``, with a failure inside transformers turned into one line naming ``what``."""
    try:
        return load()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{what}: cannot load it ({text[:300]})") from None


def load_model(cfg: TrainConfig, checkpoint: Optional[Path], device, dtype, verbose: bool = True):
    """The policy and its tokenizer: from the checkpoint when resuming, else the demo or ``--model``
    (its folders checked by :func:`check_model_source` and ``checkpoint.validate_checkpoint``)."""
    if checkpoint is None and cfg.model == "demo":
        from arpo_fast.train.demo import demo_model, demo_tokenizer, move_model, warm_start

        tokenizer = demo_tokenizer()
        model = move_model(demo_model(tokenizer, seed=cfg.seed), device, dtype)
        if cfg.demo_warm_start:
            t0 = time.perf_counter()
            loss = warm_start(
                model,
                tokenizer,
                cfg.demo_warm_start,
                seed=cfg.seed,
                log=(lambda line: print(line, flush=True)) if verbose else None,
            )
            if verbose:
                print(
                    f"demo warm start: {cfg.demo_warm_start} supervised steps, loss {loss:.3f}, "
                    f"{time.perf_counter() - t0:.1f}s",
                    flush=True,
                )
        return model.eval(), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint / "model" if checkpoint is not None else Path(cfg.model)
    source = str(checkpoint / "tokenizer") if checkpoint is not None else cfg.tokenizer or str(path)
    flag = "--tokenizer" if cfg.tokenizer and checkpoint is None else "--model"
    tokenizer = _loaded(f"{flag} {source} (its tokenizer)", lambda: AutoTokenizer.from_pretrained(source))
    model = _loaded(f"--model {path}", lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    return model.to(device).eval(), tokenizer


def _json_object(text: str, flag: str, shape: str) -> dict:
    value = load_json(text, flag)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object: {shape}")
    return value


def tool_settings(cfg: TrainConfig) -> dict:
    """Each tool's settings from ``--tool-settings``, checked with the names in ``--tools`` before
    anything slow: unknown tools and settings (with the close match), values of the wrong type,
    missing files and a sandbox that cannot work here each fail in one line naming the flag."""
    settings = _json_object(cfg.tool_settings, "--tool-settings", "{tool name: {setting: value}}")
    known = tool_names()
    for name in cfg.tool_names:
        if name not in known:
            raise ValueError(
                f"--tools: no tool named {name!r}{close_match(name, known)}; available: {', '.join(known)}"
            )
    extra = sorted(set(settings) - set(cfg.tool_names))
    if extra:
        hint = close_match(extra[0], cfg.tool_names)
        raise ValueError(f"--tool-settings names tools not in --tools: {', '.join(extra)}{hint}")
    for name, value in settings.items():
        if not isinstance(value, dict):
            raise ValueError(
                f"--tool-settings: the settings of {name!r} must be a JSON object, got {shown(value)}"
            )
    for name in cfg.tool_names:
        try:
            check_tool_settings(name, **settings.get(name, {}))
        except ValueError as exc:
            raise ValueError(f"--tool-settings: {name}: {' '.join(str(exc).split())}") from None
    return settings


def tool_executor(cfg: TrainConfig, settings: dict) -> Optional[ToolExecutor]:
    """The run's tools, each built from its ``--tool-settings`` (checked by :func:`tool_settings`),
    behind one executor."""
    tools = []
    for name in cfg.tool_names:
        try:
            tools.append(create_tool(name, **settings.get(name, {})))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"--tool-settings: {name}: {' '.join(str(exc).split())}") from None
    config = ExecutorConfig(max_workers=cfg.tool_workers)
    return ToolExecutor({t.name: t for t in tools}, config) if tools else None


def reward_config(cfg: TrainConfig) -> RewardConfig:
    by_source = _json_object(cfg.reward_by_source, "--reward-by-source", "{data_source: reward name}")
    try:
        return RewardConfig(default=cfg.reward, by_data_source=by_source)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None


def protocol_for(cfg: TrainConfig, tokenizer, executor: Optional[ToolExecutor], eos_token_ids) -> Protocol:
    """The tool-call protocol: tags are the tools' own names (http_search answers <search>); the
    usual tags stay recognised, so a call to a tool this run lacks reads back an error instead of
    passing as plain text."""
    names = tuple(executor.tools) if executor is not None else ()
    tags = ProtocolConfig(
        tool_names=tuple(dict.fromkeys(ProtocolConfig().tool_names + names)),
        max_calls=cfg.max_calls,
        stop_at_answer=cfg.stop_at_answer,
    )
    return Protocol(tokenizer, tags, eos_token_ids=eos_token_ids, available_tools=names)

"""From settings to the objects a run uses: the device and dtype, the model and tokenizer, the
tools and their executor, the rewards and the tool-call protocol. Every bad setting fails here with
a one-line message naming its flag, before anything is written."""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Optional

import torch

from arpo_fast.engine.model import SUPPORTED_MODEL_TYPES
from arpo_fast.rollout import Protocol, ProtocolConfig, RewardConfig
from arpo_fast.rollout.rewards import reward_names
from arpo_fast.rollout.tools import check_tool_settings, create_tool, tool_names
from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor
from arpo_fast.rollout.tools.validate import close_match, load_json, shown
from arpo_fast.train import lora_run
from arpo_fast.train.config import TrainConfig
from arpo_fast.train.demo import is_demo

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
    ``--model`` again only as the KL reference (``--kl-coef``) or as a LoRA run's base."""
    if resuming and not cfg.update.kl_coef and not cfg.lora_rank:
        return
    if is_demo(cfg.model):
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


def _saved_tokenizer(folder: Path):
    """A checkpoint's tokenizer, as the class it was saved as: ``AutoTokenizer`` would take the
    model type's class instead where the two differ (a tokenizer of one's own beside a Qwen2
    config.json)."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    try:
        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        cls = tokenizer_class_from_name(saved.get("tokenizer_class") or "") or AutoTokenizer
    except (OSError, ValueError):
        cls = AutoTokenizer
    return cls.from_pretrained(folder)


def load_tokenizer(cfg: TrainConfig, checkpoint: Optional[Path]) -> tuple[object, Optional[int]]:
    """The run's tokenizer and the model's context (``max_position_embeddings``, None if its config
    has none), read before any weights: from the checkpoint when resuming, else the demo's or
    ``--tokenizer``/``--model``'s. A model type the engine does not run fails here."""
    from transformers import AutoConfig

    if checkpoint is None and is_demo(cfg.model):
        from arpo_fast.train.demo import demo_config, demo_tokenizer

        tokenizer = demo_tokenizer()
        return tokenizer, demo_config(tokenizer).max_position_embeddings
    path = Path(cfg.model) if checkpoint is None else _checkpoint_model(checkpoint, cfg)
    config = _loaded(f"--model {path} (its config.json)", lambda: AutoConfig.from_pretrained(path))
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"--model {path}: model type {kind!r} is not one the engine runs "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if checkpoint is not None:  # beside the model (the adapter); in tokenizer/ in checkpoints written before
        folder = path if (path / "tokenizer_config.json").exists() else checkpoint / "tokenizer"
        if lora_run.is_lora_checkpoint(checkpoint):
            folder = checkpoint / lora_run.ADAPTER_DIR
        tokenizer = _loaded(f"the checkpoint's tokenizer {folder}", lambda: _saved_tokenizer(folder))
    else:
        from transformers import AutoTokenizer

        source = cfg.tokenizer or str(path)
        flag = "--tokenizer" if cfg.tokenizer else "--model"
        tokenizer = _loaded(f"{flag} {source} (its tokenizer)", lambda: AutoTokenizer.from_pretrained(source))
    return tokenizer, getattr(config, "max_position_embeddings", None)


def _checkpoint_model(checkpoint: Path, cfg: TrainConfig) -> Path:
    """The folder of a checkpoint's model: its ``model/``, or a LoRA checkpoint's base."""
    if lora_run.is_lora_checkpoint(checkpoint):
        return lora_run.base_folder(checkpoint, cfg)
    return checkpoint / "model"


def load_model(cfg: TrainConfig, checkpoint: Optional[Path], device, dtype, tokenizer, verbose: bool = True):
    """The policy for ``tokenizer`` (:func:`load_tokenizer`'s): from the checkpoint when resuming,
    else the demo (warm-started) or ``--model`` (its folders checked by :func:`check_model_source`
    and ``checkpoint.validate_checkpoint``). A LoRA checkpoint gives its base, without adapters
    (``lora_run.attach`` adds them): the checkpoint's ``base/``, or ``--model``."""
    if checkpoint is not None and lora_run.is_lora_checkpoint(checkpoint):
        folder = lora_run.base_folder(checkpoint, cfg)
        if folder.parent != Path(checkpoint):
            checkpoint = None  # the base is --model's, loaded below
        else:
            from arpo_fast.train.checkpoint import load_model as load_checkpoint_model

            return load_checkpoint_model(checkpoint, device, dtype, folder.name)
    if checkpoint is None and is_demo(cfg.model):
        from arpo_fast.train.demo import demo_model, move_model, warm_start

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
        return model.eval()
    if checkpoint is not None:
        from arpo_fast.train.checkpoint import load_model as load_checkpoint_model

        return load_checkpoint_model(checkpoint, device, dtype)
    from transformers import AutoModelForCausalLM

    path = Path(cfg.model)
    model = _loaded(f"--model {path}", lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
    return model.to(device).eval()


def set_threads(cfg: TrainConfig, verbose: bool) -> None:
    """Set torch's intra-op threads, for the whole process, to ``--cpu-threads`` when it is not
    auto or auto resolved it (the demo's); ``verbose``: say so."""
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
        if verbose:
            print(f"torch intra-op threads: {cfg.cpu_threads} (--cpu-threads)", flush=True)


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
    """The rewards by ``--reward-key`` value; an unknown reward name fails naming its flag and the
    closest registered name."""
    by_source = _json_object(
        cfg.reward_by_source, "--reward-by-source", f"{{{cfg.reward_key} value: reward name}}"
    )
    for flag, name in (("--reward", cfg.reward), *(("--reward-by-source", n) for n in by_source.values())):
        if name not in reward_names():
            close = difflib.get_close_matches(str(name), reward_names(), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(
                f"{flag}: no reward named {name!r}{hint}; registered: {', '.join(reward_names())}"
            )
    return RewardConfig(default=cfg.reward, by_data_source=by_source)


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

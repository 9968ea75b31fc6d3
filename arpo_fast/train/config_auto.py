"""The job-dependent defaults of :class:`~arpo_fast.train.config.TrainConfig`: a setting left
``auto`` (None) gets its value here, and only here, once the config's checks have passed."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING

from arpo_fast.train.demo import DEMO, is_demo, threads
from arpo_fast.train.demo import LORA_LR as DEMO_LORA_LR
from arpo_fast.train.demo import LR as DEMO_LR
from arpo_fast.train.demo import MINI_BATCH_PROMPTS as DEMO_MINI_BATCH
from arpo_fast.train.demo import PROMPTS_PER_STEP as DEMO_PROMPTS
from arpo_fast.train.demo import RESPONSE_TOKENS as DEMO_RESPONSE

if TYPE_CHECKING:
    from arpo_fast.train.config import TrainConfig

REFERENCE_LR = 1e-6
REFERENCE_MINI_BATCH = 16
DEMO_EVAL_SAMPLES = 4
"""Sampled answers per held-out problem of the demo: its sampled accuracy over 4 x 128 answers."""
LORA_LR = 1e-5
"""The learning rate of LoRA adapters on a model of one's own (auto): LoRA is commonly tuned at
about 10x the rate of full-weight training, here 10x the reference's."""
REFERENCE_PROMPTS = 128
"""The reference's prompts per step (its 7B reasoning script's ``data.train_batch_size``)."""
REFERENCE_RESPONSE = 4096
"""The reference's response length (the same script's ``data.max_response_length``)."""


def resolve_auto(cfg: TrainConfig) -> None:
    """The one place where ``auto`` (None) settings get their value for this job; the names of
    those that did are kept in ``auto_settings`` (flag-level names, the fields of ``rollout``
    and ``update`` included). A real model gets the job settings of the reference's 7B
    reasoning script (prompts per step, response length, learning rate); the demo its own,
    never inherited by a run on a model or data of its own (nor are its held-out set and
    thread count). ``tokenizer``, ``kv_memory_mb`` and ``eval_limit`` stay None: the model's
    tokenizer, the engine's pool size and every held-out prompt."""
    cfg.auto_settings = frozenset(name for name, value in cfg.flat().items() if value is None)
    demo = is_demo(cfg.model)
    if cfg.lr is None:
        if cfg.lora_rank:
            cfg.lr = DEMO_LORA_LR if demo else LORA_LR
        else:
            cfg.lr = DEMO_LR if demo else REFERENCE_LR
    if cfg.prompts_per_step is None:
        cfg.prompts_per_step = DEMO_PROMPTS if demo else REFERENCE_PROMPTS
    if cfg.rollout.max_response_tokens is None:
        response = DEMO_RESPONSE if demo else REFERENCE_RESPONSE
        cfg.rollout = dataclasses.replace(cfg.rollout, max_response_tokens=response)
    if cfg.rollout.branch_budget is None:
        pooled = "pooled" if cfg.rollout.pooled else "split"
        cfg.rollout = dataclasses.replace(cfg.rollout, branch_budget=pooled)
    if cfg.update.loss_agg is None:
        agg = "dynamic-bsz" if cfg.rollout.arpo_semantics == "reference" else "token-mean"
        cfg.update = dataclasses.replace(cfg.update, loss_agg=agg)
    if cfg.eval_data is None:
        cfg.eval_data = DEMO if is_demo(cfg.data) else "none"
    if cfg.test_data is None:  # with the held-out evaluation: a run without one has no test
        cfg.test_data = DEMO if is_demo(cfg.data) and cfg.eval_data != "none" else "none"
    if cfg.eval_samples is None:
        cfg.eval_samples = DEMO_EVAL_SAMPLES if is_demo(cfg.data) else 0
    if cfg.eval_temperature is None:
        cfg.eval_temperature = cfg.temperature
    if cfg.update.mini_batch_prompts is None:
        cfg.auto_settings |= {"mini_batch_prompts"}
        per = DEMO_MINI_BATCH if is_demo(cfg.model) else REFERENCE_MINI_BATCH
        cfg.update = dataclasses.replace(cfg.update, mini_batch_prompts=per)
    if cfg.cpu_threads is None and is_demo(cfg.model) and "OMP_NUM_THREADS" not in os.environ:
        cfg.cpu_threads = threads()
    if cfg.out is None:
        cfg.out = time.strftime("runs/arpo-%Y%m%d-%H%M%S")

"""Activation checkpointing of the update: each decoder layer keeps only its input for backward and
recomputes the rest there (non-reentrant ``torch.utils.checkpoint``), in eval mode too (Hugging
Face's own switch only acts in training mode, and the update runs the model in eval mode: no
dropout). ``update_config.resolve_checkpointing`` says when it is on."""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from arpo_fast.train.hf_adapter import wrapped_layers


@contextlib.contextmanager
def activation_checkpointing(model, enabled: bool):
    """Inside the block every decoder layer of ``model`` is checkpointed (when ``enabled``)."""
    with wrapped_layers(model, _checkpointed, enabled):
        yield


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to recompute for
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run

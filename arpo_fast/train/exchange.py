"""Moving each mini-batch's trajectories to the ranks that train on them (``balance.py`` plans it).

After the rollout every rank describes its trees (``balance.Shape``: token counts only) to every
other (one ``all_gather_object``), and all plan the same split. Then each rank that gives work away
sends every other rank what it needs: per prompt its token ids, the segments on the trajectories'
paths (tokens, loss mask and the sampler's log-probs, as numpy arrays), the paths and their
advantages, pickled, one ``scatter_object_list`` per sending rank on the gloo group of the
rollout's waits (these are host data; no device memory is involved). A rank rebuilds what it
received, and what it keeps, as a ``RolloutTree`` of its own, and the update runs on that.

Only what changes rank moves. The sampler's log-probs travel as fp32, the precision the update
reads them in; entropies do not travel (the update does not read them).
"""

from __future__ import annotations

import dataclasses
import pickle
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from arpo_fast.rollout.rollout_tree import RolloutTree, Segment, Trajectory
from arpo_fast.train import balance


@dataclass
class _Prompt:
    """What one rank sends of one prompt's tree: the prompt, the segments on the sent paths (by
    their index on the sending rank: parent, start, ids, loss mask, log-probs), and per trajectory
    (mini-batch, path, kind, advantages)."""

    prompt: np.ndarray
    segments: dict[int, tuple]
    trajectories: list[tuple[int, list[int], str, np.ndarray]]


def payload(record: RolloutTree, advantages, wanted: list[tuple[int, int]]) -> list[_Prompt]:
    """The data of trajectories ``wanted`` ((mini-batch, trajectory) pairs) of ``record``, by prompt."""
    by_prompt: dict[int, list[tuple[int, int]]] = {}
    for k, i in wanted:
        by_prompt.setdefault(record.trajectories[i].prompt_index, []).append((k, i))
    out = []
    for p, items in by_prompt.items():
        segments = {}
        for _, i in items:
            for u in record.trajectories[i].path:
                if u not in segments:
                    s = record.segments[u]
                    segments[u] = (
                        s.parent,
                        s.start,
                        np.asarray(s.token_ids, dtype=np.int64),
                        np.asarray(s.loss_mask, dtype=np.int8),
                        np.asarray(s.logprobs, dtype=np.float32),
                    )
        trajectories = [
            (k, record.trajectories[i].path, record.trajectories[i].kind, advantages[i].float().cpu().numpy())
            for k, i in items
        ]
        out.append(_Prompt(np.asarray(record.prompts[p], dtype=np.int64), segments, trajectories))
    return out


def merge(parts: list[list[_Prompt]], count: int) -> tuple[RolloutTree, list[torch.Tensor], list[list[int]]]:
    """One record of every part (in order), its trajectories' advantages, and per mini-batch
    (``count`` of them) its trajectories' indices."""
    record = RolloutTree(prompts=[])
    advantages: list[torch.Tensor] = []
    groups: list[list[int]] = [[] for _ in range(count)]
    for part in parts:
        for entry in part:
            p = len(record.prompts)
            record.prompts.append(entry.prompt.tolist())
            new = {u: len(record.segments) + j for j, u in enumerate(sorted(entry.segments))}
            for u in sorted(entry.segments):
                parent, start, ids, mask, logprobs = entry.segments[u]
                parent = None if parent is None else new[parent]
                record.segments.append(
                    Segment(p, parent, start, ids.tolist(), mask.tolist(), logprobs.tolist())
                )
            for k, path, kind, adv in entry.trajectories:
                groups[k].append(len(record.trajectories))
                record.trajectories.append(Trajectory(record, p, kind, [new[u] for u in path]))
                advantages.append(torch.from_numpy(adv))
    return record.link(), advantages, groups


def _plans(data, groups: list[list[int]], share: bool, d) -> list[tuple[list[balance.Shape], balance.Plan]]:
    """Every mini-batch's shapes (every rank's, in step order) and split, the same on every rank."""
    positions = data.positions or list(range(len(data.record.prompts)))
    mine = [balance.shapes(data.record, g, share, d.rank, positions) for g in groups]
    everyone = d.gather(mine, group=d.rollout_group)
    out = []
    for k in range(len(groups)):
        units = sorted((s for ranks in everyone for s in ranks[k]), key=lambda s: s.position)
        out.append((units, balance.plan(units, d.world)))
    return out


def redistribute(data, groups: list[list[int]], share: bool, d):
    """``data`` (``update.UpdateData``) with this rank's share of every mini-batch (``groups``: this
    rank's trajectories per mini-batch, numbered the same on every rank), and the split's metrics:
    ``update_balance`` (``balance.balance``), ``update_idle_ranks`` (the most ranks without work in a
    mini-batch), ``update_exchange_mb`` (received by this rank) and ``update_exchange_s``."""
    started = time.perf_counter()
    plans = _plans(data, groups, share, d)
    outgoing: list[list[tuple[int, int]]] = [[] for _ in range(d.world)]
    sends = [False] * d.world  # which ranks give work away: only they scatter
    for k, (units, split) in enumerate(plans):
        for dest, pieces in enumerate(split.pieces):
            for s, trajectories in pieces:
                sends[units[s].rank] |= units[s].rank != dest
                if units[s].rank == d.rank:
                    outgoing[dest].extend((k, i) for i in trajectories)
    parts, received = _exchange([payload(data.record, data.advantages, w) for w in outgoing], sends, d)
    record, advantages, mine = merge(parts, len(groups))
    stats = {
        "update_balance": balance.balance([split for _, split in plans]),
        "update_idle_ranks": float(max((split.idle for _, split in plans), default=0)),
        "update_exchange_mb": received / 2**20,
        "update_exchange_s": time.perf_counter() - started,
    }
    return dataclasses.replace(data, record=record, advantages=advantages, mini_batches=mine), stats


def _exchange(payloads: list[list[_Prompt]], sends: list[bool], d) -> tuple[list[list[_Prompt]], int]:
    """Every rank's payload for this one, in rank order (this rank's own kept as it is), and the
    bytes received."""
    parts, received = [], 0
    for src in range(d.world):
        if not sends[src]:
            parts.append(payloads[src] if src == d.rank else [])
            continue
        blobs = None
        if src == d.rank:  # its own part stays here unpickled
            blobs = [
                b"" if r == d.rank else pickle.dumps(p, pickle.HIGHEST_PROTOCOL)
                for r, p in enumerate(payloads)
            ]
        box: list[Any] = [None]
        tdist.scatter_object_list(box, blobs, src=src, group=d.rollout_group)
        if src == d.rank:
            parts.append(payloads[src])
        else:
            received += len(box[0])
            parts.append(pickle.loads(box[0]))
    return parts, received

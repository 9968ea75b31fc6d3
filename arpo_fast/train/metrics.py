"""A training step's metrics row and its printed line.

The row holds the rollout's counts, the reward rates and the update's metrics. In a distributed
run every number covers all ranks: counts are summed, rates are means over every trajectory, the
update's metrics are means over every model-written token, the mismatch maximum and the stage times
are the largest of any rank.
"""

from __future__ import annotations

from typing import Optional

from arpo_fast.rollout.rollout_tree import RolloutTree

# the update's metrics that are equal on every rank (or the largest one counts)
SAME_ON_EVERY_RANK = (
    "grad_norm",
    "optimizer_steps",
    "skipped_updates",
    "update_balance",
    "update_idle_ranks",
)
LARGEST = ("logprob_mismatch_max", "update_exchange_s")
SUMMED = ("forward_tokens", "update_exchange_mb")  # counts of each rank's own work


def rollout_sums(rollout: RolloutTree, rewards) -> dict[str, float]:
    """This rank's additive counts of a step's rollout (its record) and rewards."""
    total, unique = rollout.response_tokens, rollout.unique_tokens
    return {
        "trajectories": len(rollout.trajectories),
        "reward": sum(r.score for r in rewards),
        "tool_calls_per_traj": sum(t.tool_calls for t in rollout.trajectories),
        "correct": sum(r.correctness > 0 for r in rewards),
        "format_ok": sum(r.score > -1 for r in rewards),
        "tool_calls": rollout.stats["tool_calls"],
        "branch_points": rollout.stats["branch_points"],
        "fills": rollout.stats["fills"],
        "response_tokens": total,
        "shared_tokens": total - unique,
        "model_tokens": rollout.stats["model_tokens"],
    }


def step_row(
    step: int, sums: dict, update: dict, times: dict, dist=None, extra: Optional[dict] = None
) -> dict:
    """The metrics row of ``step`` from this rank's ``rollout_sums``, ``update`` metrics (token
    means over its ``tokens``) and stage ``times``, reduced over ``dist``'s ranks when given."""
    if dist is not None:
        sums, update, times = _reduce(sums, update, times, dist)
    n = max(sums["trajectories"], 1)
    row = {
        "step": step,
        "reward": sums["reward"] / n,
        "correct": sums["correct"] / n,
        "format_ok": sums["format_ok"] / n,
        "tool_calls_per_traj": sums["tool_calls_per_traj"] / n,
    }
    row.update({k: int(v) for k, v in sums.items() if k not in row})
    row.update({k: round(v, 6) for k, v in update.items()})
    row.update(extra or {})
    row.update({f"{k}_s": round(v, 3) for k, v in times.items()})
    return row


def _reduce(sums: dict, update: dict, times: dict, dist) -> tuple[dict, dict, dict]:
    # a rank with no tokens has fewer update metrics: agree on the keys first
    keys = sorted(set().union(*dist.gather(sorted(update))) - {"tokens"})
    tokens = update.get("tokens", 0.0)
    weighted = [k for k in keys if k not in SAME_ON_EVERY_RANK + LARGEST + SUMMED]
    summed = [k for k in SUMMED if k in keys]
    sum_keys = sorted(sums)
    totals = dist.sum(
        [sums[k] for k in sum_keys]
        + [tokens]
        + [update.get(k, 0.0) * tokens for k in weighted]
        + [update.get(k, 0.0) for k in summed]
    )
    largest = dist.max(
        [update.get(k, float("-inf")) for k in LARGEST if k in keys]
        + [update.get(k, float("-inf")) for k in SAME_ON_EVERY_RANK if k in keys]
        + [times[k] for k in sorted(times)]
    )
    out_sums = dict(zip(sum_keys, totals))
    all_tokens = totals[len(sum_keys)]
    means = totals[len(sum_keys) + 1 : len(totals) - len(summed)]
    out_update = {k: v / max(all_tokens, 1) for k, v in zip(weighted, means)}
    out_update.update(zip(summed, totals[len(totals) - len(summed) :]))
    named = [k for k in LARGEST if k in keys] + [k for k in SAME_ON_EVERY_RANK if k in keys]
    out_update.update(zip(named, largest))
    out_update["tokens"] = all_tokens
    out_times = dict(zip(sorted(times), largest[len(named) :]))
    return out_sums, out_update, out_times


def eval_row(row: dict, dist) -> dict:
    """An evaluation row (``eval.evaluate``, of any split) of this rank's share of the examples,
    made the row of all of them: means weighted by each rank's examples, the time of the slowest
    rank."""
    split = next(k for k in row if k.endswith("/examples")).split("/")[0]
    count, seconds = f"{split}/examples", f"{split}/s"
    keys = sorted(k for k in row if k not in ("step", count, seconds))
    n = row[count]
    totals = dist.sum([n] + [row[k] * n for k in keys])
    out = {"step": row["step"], **{k: v / max(totals[0], 1) for k, v in zip(keys, totals[1:])}}
    out[count] = int(totals[0])
    out[seconds] = round(dist.max([row[seconds]])[0], 3)
    return out


def line(m: dict, steps: int) -> str:
    """One step as a line of the log."""
    return (
        f"step {m['step']}/{steps}  reward {m['reward']:+.3f}  correct {m['correct']:.2f}  "
        f"format {m['format_ok']:.2f}  calls/traj {m['tool_calls_per_traj']:.2f}  "
        f"traj {m['trajectories']}  calls {m['tool_calls']}  "
        f"branches {m['branch_points']}  tokens {m['response_tokens']} "
        f"(shared {m['shared_tokens']})  loss {m.get('loss', 0.0):+.4f}  "
        f"clip {m.get('clip_fraction', 0.0):.3f}  grad {m['grad_norm']:.3f}  "
        f"rollout {m['rollout_s']:.1f}s  update {m['update_s']:.1f}s"
    )

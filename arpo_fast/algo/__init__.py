"""ARPO's learning signal, in plain torch: GRPO group advantages, their attribution to the tokens of a
rollout tree (``"soft"``, plain GRPO and ARPO's default, or ``"hard"``, where a shared prefix gets the
mean advantage of the trajectories through it), the clipped policy loss with dual clip,
token-mean over model-written tokens (or verl's other aggregations: ``aggregation``), and the k3
estimate of the KL to a reference policy. Of the
rest of the package only the rollout's record (``rollout.rollout_tree``) is imported.
"""

from arpo_fast.algo.advantages import group_advantages, shared_token_count, token_advantages, tree_advantages
from arpo_fast.algo.loss import CopyAdvantages, aggregate, kl_k3, policy_loss, shared_policy_loss

__all__ = [
    "CopyAdvantages",
    "aggregate",
    "group_advantages",
    "kl_k3",
    "policy_loss",
    "shared_policy_loss",
    "shared_token_count",
    "token_advantages",
    "tree_advantages",
]

"""Advantages and policy loss against plain loop computations in float64."""

import math
import random

import pytest
import torch

from arpo_fast.algo import aggregate, group_advantages, policy_loss, shared_token_count, token_advantages

# --------------------------------------------------------------------------- group advantages


def group_advantages_loop(rewards, groups, eps=1e-6, scale="std"):
    out = []
    for r, g in zip(rewards, groups):
        mates = [x for x, h in zip(rewards, groups) if h == g]
        if len(mates) < 2 or max(mates) == min(mates):
            out.append(0.0)
            continue
        mean = sum(mates) / len(mates)
        std = math.sqrt(sum((x - mean) ** 2 for x in mates) / (len(mates) - 1))
        out.append((r - mean) / (std + eps) if scale == "std" else r - mean)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_random_groups(seed, scale):
    rng = random.Random(seed)
    ids = rng.sample(range(-50, 1000), 7)  # non-contiguous, negative too
    groups = [rng.choice(ids[:-2]) for _ in range(61)] + [ids[-1]]  # ids[-1]: a singleton
    groups += [ids[-2]] * 3  # a group with equal rewards
    rng.shuffle(groups)
    rewards = [rng.gauss(0, 2) if g != ids[-2] else 0.1 for g in groups]
    got = group_advantages(torch.tensor(rewards), torch.tensor(groups), scale=scale)
    assert got.dtype == torch.float32 and got.shape == (len(rewards),)
    # the reference sees the same float32 rewards the tensor holds
    r32 = torch.tensor(rewards).double().tolist()
    want = torch.tensor(group_advantages_loop(r32, groups, scale=scale), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for i, g in enumerate(groups):
        if g in (ids[-1], ids[-2]):
            assert got[i].item() == 0.0


def test_group_advantages_matches_torch_std_and_lists():
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 3.0])
    g = [7, 3, 7, 3, 7, 3]
    got = group_advantages(r.tolist(), g, eps=0.0)
    for gid in (7, 3):
        sel = torch.tensor(g) == gid
        want = (r[sel] - r[sel].mean()) / r[sel].std()
        torch.testing.assert_close(got[sel], want)


def test_group_advantages_equal_rewards_exact_zero_even_without_eps():
    got = group_advantages([0.1, 0.1, 0.1, 0.7, 0.2], [0, 0, 0, 1, 1], eps=0.0)
    assert got[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(got).all()


def test_group_advantages_empty_and_integer_rewards():
    assert group_advantages([], []).shape == (0,)
    got = group_advantages(torch.tensor([1, 0, 1, 1]), torch.tensor([0, 0, 1, 1], dtype=torch.int32))
    assert got[2:].tolist() == [0.0, 0.0] and got[0] > 0 > got[1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rewards=[1.0, 2.0], groups=[0]), "same length"),
        (dict(rewards=[1.0, float("nan"), 2.0, float("inf")], groups=[0, 0, 0, 0]), r"indices \[1, 3\]"),
        (dict(rewards=[1.0], groups=[0], scale="mad"), "scale must be one of"),
        (dict(rewards=[1.0], groups=[0], eps=-1e-3), "eps must be >= 0"),
        (dict(rewards=[1.0], groups=[0], eps=float("nan")), "eps must be >= 0"),
        (dict(rewards=torch.zeros(2, 2), groups=[0, 0]), r"rewards must be 1-D"),
        (dict(rewards=[1.0, 2.0], groups=torch.tensor([0.0, 1.0])), "groups must have an integer dtype"),
        (dict(rewards=["a"], groups=[0]), "rewards must be a 1-D tensor or a list"),
    ],
)
def test_group_advantages_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)


# --------------------------------------------------------------------------- token advantages

# Root 10 (3 tokens) shared by 4 trajectories; node 20 (2 tokens) shared by trajectories 0 and 1.
HAND_PATHS = [
    [(10, 3), (20, 2), (30, 1)],
    [(10, 3), (20, 2), (31, 2)],
    [(10, 3), (21, 4)],
    [(10, 3), (22, 0), (23, 1)],
]
HAND_ADV = [1.0, -0.5, 2.0, -1.5]


def test_token_advantages_hand_built_tree():
    soft = token_advantages(torch.tensor(HAND_ADV), HAND_PATHS)
    assert [t.tolist() for t in soft] == [[a] * n for a, n in zip(HAND_ADV, [6, 7, 7, 4])]
    hard = token_advantages(HAND_ADV, HAND_PATHS, mode="hard")
    root, branch = 0.25, 0.25  # (1 - 0.5 + 2 - 1.5) / 4 and (1 - 0.5) / 2
    assert hard[0].tolist() == [root] * 3 + [branch] * 2 + [1.0]
    assert hard[1].tolist() == [root] * 3 + [branch] * 2 + [-0.5] * 2
    assert hard[2].tolist() == [root] * 3 + [2.0] * 4
    assert hard[3].tolist() == [root] * 3 + [-1.5]
    assert all(t.dtype == torch.float32 for t in hard + soft)
    assert shared_token_count(HAND_PATHS) == (24, 13)


def random_tree(rng, n_nodes):
    """Paths root -> leaf of a random tree with scattered node ids, in shuffled order."""
    parent = [None] + [rng.randrange(v) for v in range(1, n_nodes)]
    has_child = {p for p in parent if p is not None}
    ids = rng.sample(range(10_000), n_nodes)
    tokens = [rng.randrange(6) for _ in range(n_nodes)]
    paths = []
    for leaf in (v for v in range(n_nodes) if v not in has_child):
        chain, v = [], leaf
        while v is not None:
            chain.append((ids[v], tokens[v]))
            v = parent[v]
        paths.append(chain[::-1])
    rng.shuffle(paths)
    return paths


def token_advantages_loop(adv, paths, mode):
    out = []
    for i, path in enumerate(paths):
        row = []
        for node, n in path:
            sharers = [adv[j] for j, p in enumerate(paths) if node in dict(p)]
            row += [adv[i] if mode == "soft" else sum(sharers) / len(sharers)] * n
        out.append(row)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_token_advantages_random_trees(seed, mode):
    rng = random.Random(seed)
    paths = random_tree(rng, rng.randrange(1, 30))
    adv = [rng.gauss(0, 1) for _ in paths]
    got = token_advantages(torch.tensor(adv, dtype=torch.float64), paths, mode=mode)
    want = token_advantages_loop(adv, paths, mode)
    assert len(got) == len(paths)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, torch.tensor(w, dtype=torch.float32))


@pytest.mark.parametrize("seed", range(4))
def test_hard_attribution_conserves_each_node_total(seed):
    """A node's hard advantage times its sharers is the sum of their soft advantages, so the two
    modes put the same total advantage on every node and on the whole tree."""
    rng = random.Random(seed)
    paths = random_tree(rng, 25)
    adv = torch.randn(len(paths), dtype=torch.float64)
    soft = token_advantages(adv, paths, mode="soft")
    hard = token_advantages(adv, paths, mode="hard")
    node_sum: dict[int, list[float]] = {}
    for i, path in enumerate(paths):
        start = 0
        for node, n in path:
            if n:
                assert torch.unique(hard[i][start : start + n]).numel() == 1
                h, s = hard[i][start].item(), soft[i][start].item()
                node_sum.setdefault(node, [h, 0.0, 0])
                node_sum[node][1] += s
                node_sum[node][2] += 1
            start += n
    for h, s, d in node_sum.values():
        assert h * d == pytest.approx(s, abs=1e-5)
    total_soft = sum(t.double().sum().item() for t in soft)
    total_hard = sum(t.double().sum().item() for t in hard)
    assert total_hard == pytest.approx(total_soft, abs=1e-4)
    total, unique = shared_token_count(paths)
    assert total == sum(t.numel() for t in soft) and unique <= total


def test_token_advantages_single_trajectory_and_empty():
    assert token_advantages([0.7], [[(5, 3)]], mode="hard")[0].tolist() == pytest.approx([0.7] * 3)
    assert token_advantages([], []) == []
    assert token_advantages([1.0], [[]])[0].shape == (0,)


@pytest.mark.parametrize(
    "adv, paths, mode, match",
    [
        (
            [1.0, 2.0],
            [[(0, 2), (1, 1)], [(0, 3)]],
            "soft",
            r"node 0 has 3 tokens in trajectory 1 but 2 in trajectory 0",
        ),
        ([1.0], [[(0, 2), (1, 1), (0, 2)]], "hard", r"node 0 appears twice in the path of trajectory 0"),
        ([1.0], [[(4, -1)]], "soft", r"node 4 in trajectory 0 has negative n_tokens -1"),
        ([1.0, 2.0], [[(0, 1)]], "soft", r"got 1 paths for 2 advantages"),
        ([1.0], [[(0, 1)]], "mean", r"mode must be one of"),
        ([1.0], [[(0, 1, 2)]], "soft", r"segment 0 of trajectory 0 must be a pair"),
        ([1.0], [[(0.5, 1)]], "soft", r"segment 0 of trajectory 0 must be a pair"),
        ([1.0, 2.0], [[(0, 1), (2, 1)], [(1, 1), (2, 1)]], "hard", r"node 2 follows node 1 in trajectory 1"),
        ([1.0, 2.0], [[(0, 1), (2, 1)], [(2, 1)]], "hard", r"node 2 follows the start in trajectory 1"),
        ([1.0, float("nan")], [[(0, 1)], [(1, 1)]], "soft", r"seq_advantages must be finite.*\[1\]"),
    ],
)
def test_token_advantages_errors(adv, paths, mode, match):
    with pytest.raises(ValueError, match=match):
        token_advantages(adv, paths, mode=mode)


def test_shared_token_count_validates():
    with pytest.raises(ValueError, match="node 1 has 2 tokens in trajectory 1"):
        shared_token_count([[(1, 1)], [(1, 2)]])


# --------------------------------------------------------------------------- policy loss


def policy_loss_loop(lp, old, adv, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0, entropy=None, coef=0.0):
    """Token by token in float64 with scalar autograd; returns (loss, metrics)."""
    B, T = lp.shape
    total, count = torch.zeros((), dtype=torch.float64), 0
    ent_total = torch.zeros((), dtype=torch.float64)
    clipped = dualed = kl = ratio_sum = 0.0
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            a = float(adv[b] if adv.dim() == 1 else adv[b, t])
            ratio = torch.exp(lp[b, t] - float(old[b, t]))
            l1 = -a * ratio
            l2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
            loss = torch.maximum(l1, l2)
            clipped += float(l2 > l1)
            if dual_clip is not None and a < 0:
                dualed += float(loss > -a * dual_clip)
                loss = torch.minimum(loss, torch.tensor(-a * dual_clip, dtype=torch.float64))
            total = total + loss
            count += 1
            kl += float(old[b, t]) - lp[b, t].item()
            ratio_sum += ratio.item()
            if entropy is not None:
                ent_total = ent_total + entropy[b, t]
    n = max(count, 1)
    loss = total / n - coef * ent_total / n
    metrics = dict(
        clip_fraction=clipped / n,
        dual_clip_fraction=dualed / n,
        approx_kl=kl / n,
        ratio_mean=ratio_sum / n,
        tokens=float(count),
    )
    return loss, metrics


def make_batch(B, T, spread=1.0, dtype=torch.float64, adv_shape="token"):
    old = -torch.rand(B, T, dtype=dtype) * 3
    lp = (old + torch.randn(B, T, dtype=dtype) * spread).requires_grad_()
    adv = torch.randn(B, T, dtype=dtype) if adv_shape == "token" else torch.randn(B, dtype=dtype)
    mask = torch.rand(B, T) < 0.7
    return lp, old, adv, mask


@pytest.mark.parametrize("B, T", [(4, 16), (3, 97)])
@pytest.mark.parametrize("spread", [0.05, 2.0])  # near 1, and ratios far outside the clip range
@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("adv_shape", ["token", "row"])
def test_policy_loss_matches_loop(B, T, spread, dual_clip, adv_shape):
    lp, old, adv, mask = make_batch(B, T, spread, adv_shape=adv_shape)
    loss, metrics = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip)
    (grad,) = torch.autograd.grad(loss, lp)
    ref_lp = lp.detach().clone().requires_grad_()
    ref, ref_metrics = policy_loss_loop(ref_lp, old, adv, mask, 0.2, 0.28, dual_clip)
    (ref_grad,) = torch.autograd.grad(ref, ref_lp)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert set(metrics) == set(ref_metrics) | {"approx_kl_k3"}
    for k, v in ref_metrics.items():
        assert metrics[k] == pytest.approx(v, abs=1e-9), k
    if spread > 1:
        assert metrics["clip_fraction"] > 0.3
        if dual_clip is not None:
            assert metrics["dual_clip_fraction"] > 0.05
    assert 0 <= metrics["approx_kl_k3"]


def test_dual_clip_caps_negative_advantage_and_kills_gradient():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 7.4, 7.4, 1.1, 0.14
    lp = torch.tensor([[2.0, 2.0, 0.1, -2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[-1.0, 1.0, -1.0, 1.0]], dtype=torch.float64)
    loss, m = policy_loss(lp, old, adv, torch.ones(1, 4, dtype=torch.bool))
    (g,) = torch.autograd.grad(loss, lp)
    # token 0: capped at 3; token 1: clipped to -1.2; token 2: unclipped 1.105; token 3: unclipped -e^-2
    want = (3.0 - 1.2 + math.exp(0.1) - math.exp(-2.0)) / 4
    assert loss.item() == pytest.approx(want)
    assert g[0, 0] == 0 and g[0, 1] == 0
    assert g[0, 2].item() == pytest.approx(math.exp(0.1) / 4)
    assert g[0, 3].item() == pytest.approx(-math.exp(-2.0) / 4)
    assert m["dual_clip_fraction"] == 0.25 and m["clip_fraction"] == 0.25


def test_extreme_ratios_and_garbage_in_masked_tokens_stay_finite():
    old = torch.tensor([[0.0, 0.0, -math.inf, 0.0]])
    lp = torch.tensor([[300.0, -300.0, 0.0, math.nan]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 5.0, math.nan]])
    mask = torch.tensor([[1, 1, 0, 0]])
    loss, m = policy_loss(lp, old, adv, mask)
    (g,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(g).all() and g[0, 2:].tolist() == [0.0, 0.0]
    # token 0: A > 0, clipped at 1.2; token 1: A < 0, ratio floored at 0.8
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert all(math.isfinite(v) for v in m.values()) and m["tokens"] == 2.0


def test_empty_mask_gives_zero_loss_and_zero_grad():
    lp, old, adv, _ = make_batch(3, 5)
    ent = torch.rand(3, 5, dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(lp, old, adv, torch.zeros(3, 5), entropy=ent, entropy_coef=0.01)
    glp, gent = torch.autograd.grad(loss, (lp, ent))
    assert loss.item() == 0.0 and glp.abs().sum() == 0 and gent.abs().sum() == 0
    assert m["tokens"] == 0.0 and all(v == 0.0 for v in m.values())


def test_entropy_bonus_and_gradient():
    lp, old, adv, mask = make_batch(3, 11)
    ent = torch.rand(3, 11, dtype=torch.float64, requires_grad=True)
    base, _ = policy_loss(lp, old, adv, mask)
    loss, m = policy_loss(lp, old, adv, mask, entropy=ent, entropy_coef=0.05)
    n = mask.sum().item()
    want = base - 0.05 * ent[mask].sum() / n
    torch.testing.assert_close(loss, want)
    (g,) = torch.autograd.grad(loss, ent)
    torch.testing.assert_close(g, -0.05 * mask.double() / n)
    assert m["entropy"] == pytest.approx(ent[mask].mean().item())
    ref, _ = policy_loss_loop(lp, old, adv, mask, entropy=ent, coef=0.05)
    torch.testing.assert_close(loss, ref)


def test_low_precision_inputs_are_computed_in_fp32():
    lp, old, adv, mask = make_batch(4, 33, spread=0.3, dtype=torch.float32)
    loss_bf, m_bf = policy_loss(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    loss_up, m_up = policy_loss(lp.bfloat16().float(), old.bfloat16().float(), adv.bfloat16().float(), mask)
    assert loss_bf.dtype == torch.float32
    assert loss_bf.item() == loss_up.item() and m_bf == m_up
    assert policy_loss(lp, old, adv, mask)[0].dtype == torch.float32
    assert policy_loss(lp.double(), old, adv, mask)[0].dtype == torch.float64


def test_policy_loss_gradcheck():
    lp, old, adv, mask = make_batch(2, 6, spread=0.5)
    ent = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    # keep ratios off the clip boundaries, where the loss has kinks
    ratio = (lp.detach() - old).exp()
    assert ((ratio - 0.8).abs() > 1e-3).all() and ((ratio - 1.2).abs() > 1e-3).all()
    assert ((ratio - 3.0).abs() > 1e-3).all()
    torch.autograd.gradcheck(
        lambda x, e: policy_loss(x, old, adv, mask, entropy=e, entropy_coef=0.1)[0], (lp, ent)
    )


def test_aggregate():
    v = torch.tensor([[1.0, 2.0, math.nan], [4.0, 5.0, 6.0]])
    assert aggregate(v, torch.tensor([[1, 1, 0], [0, 1, 0]])).item() == pytest.approx(8 / 3)
    assert aggregate(v, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def _args(**over):
    lp, old, adv, mask = make_batch(2, 3)
    args = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(logprobs=torch.zeros(6)), r"logprobs must be a 2-D tensor \[B, T\]; got \(6,\)"),
        (dict(logprobs=torch.zeros(2, 3, dtype=torch.int64)), "logprobs must be floating point"),
        (dict(old_logprobs=torch.zeros(2, 4)), r"old_logprobs must have the shape of logprobs \(2, 3\)"),
        (dict(mask=torch.ones(3, 2)), r"mask must have the shape of logprobs"),
        (dict(mask=[[1, 1, 1]] * 2), r"mask must have the shape of logprobs .* got list"),
        (dict(advantages=torch.zeros(3)), r"advantages must have shape \(2, 3\) or \(2,\); got \(3,\)"),
        (dict(entropy=torch.zeros(2, 2)), r"entropy must have the shape of logprobs"),
        (dict(entropy_coef=0.01), "entropy_coef is 0.01 but no entropy was given"),
        (dict(clip_low=1.0), r"clip_low must be in \[0, 1\)"),
        (dict(clip_low=-0.1), r"clip_low must be in \[0, 1\)"),
        (dict(clip_high=-0.1), "clip_high must be >= 0"),
        (dict(dual_clip=1.0), "dual_clip must be > 1 or None"),
        (dict(dual_clip=float("nan")), "dual_clip must be > 1 or None"),
    ],
)
def test_policy_loss_errors(over, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(**_args(**over))


def test_kl_k3_is_zero_for_identical_policies_and_its_gradient_is_the_formulas():
    from arpo_fast.algo import kl_k3

    lp = torch.randn(3, 7, dtype=torch.float64) - 2
    assert torch.equal(kl_k3(lp, lp.clone()), torch.zeros_like(lp))
    ref = lp + torch.randn_like(lp) * 0.5
    ours = lp.clone().requires_grad_()
    kl_k3(ours, ref).sum().backward()
    plain = lp.clone().requires_grad_()
    d = ref - plain  # the k3 estimator of KL(pi || ref) from samples of pi, by hand
    (torch.exp(d) - d - 1).sum().backward()
    torch.testing.assert_close(ours.grad, plain.grad)
    assert (kl_k3(lp, ref) >= 0).all() and kl_k3(lp, ref + 100).max() == 10.0  # bounded as in verl

"""The tree-packed update against the per-trajectory one: the same loss, log-probs, gradients and
metrics on random rollout trees (branches of branches, tool results, fills), soft and hard
attribution, several mini-batches and trees split across micro-batches; the mask keeps every token
on its own path; bf16 within the tolerance rule; the GPU paths (flex_attention, flash-attn) on CUDA.
"""

import copy
import itertools
import math
import random
import warnings

import pytest
import torch
from helpers import ARCHS, VOCAB, assert_rule, tiny_model

from arpo_fast.algo import CopyAdvantages, group_advantages, policy_loss, shared_policy_loss, token_advantages
from arpo_fast.rollout.responses import Response, assemble_tree
from arpo_fast.train.attention import (
    attention_implementation,
    key_bounds,
    path_masks,
    tree_block_mask,
    tree_mask,
)
from arpo_fast.train.batch import LogprobModel
from arpo_fast.train.contexts import ContextCache
from arpo_fast.train.optim import MasterWeights
from arpo_fast.train.packing import build_trees, pack_trees
from arpo_fast.train.padded import pack, token_logprobs
from arpo_fast.train.tree_batch import tree_logprobs
from arpo_fast.train.update import UpdateData, update
from arpo_fast.train.update_config import UpdateConfig, resolve_attention


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernels' PyTorch paths: seconds, not minutes


def random_rollout(seed: int, **kw):
    """The record of :func:`random_responses`, shaped like ``arpo_rollout``'s."""
    return assemble_tree(*random_responses(seed, **kw))


def random_responses(seed: int, prompts: int = 3, initial: int = 2, fork: float = 0.6, fills: int = 1):
    """Trajectories and node sizes shaped like ``arpo_rollout``'s: segments of model tokens, tool
    results (loss mask 0) after which a trajectory may fork (copies fork again), fills that share
    only the prompt, and now and then a last token with no rollout log-prob (NaN)."""
    rng = random.Random(seed)
    ids = itertools.count()
    trajs, node_tokens = [], {}
    for p in range(prompts):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        queue = [
            dict(resp=[], mask=[], lp=[], path=[next(ids)], start=0, left=rng.randint(1, 3), kind=kind)
            for kind in ["initial"] * initial + ["fill"] * fills
        ]
        while queue:
            st = queue.pop(0)
            for seg in range(st["left"]):
                n = rng.randint(1, 6)
                st["resp"] += [rng.randrange(VOCAB) for _ in range(n)]
                st["mask"] += [1] * n
                st["lp"] += [-3 * rng.random() for _ in range(n)]
                if seg + 1 < st["left"]:
                    m = rng.randint(1, 4)
                    st["resp"] += [rng.randrange(VOCAB) for _ in range(m)]
                    st["mask"] += [0] * m
                    st["lp"] += [0.0] * m
                    if st["kind"] != "fill" and rng.random() < fork:
                        queue.append(_fork(st, ids, node_tokens, rng.randint(1, 3)))
            if rng.random() < 0.2:
                st["lp"][-1] = math.nan
            node_tokens[st["path"][-1]] = len(st["resp"]) - st["start"]
            trajs.append(
                Response(
                    p,
                    prompt,
                    response_ids=st["resp"],
                    loss_mask=st["mask"],
                    logprobs=st["lp"],
                    path=st["path"],
                    kind=st["kind"],
                )
            )
    return trajs, node_tokens


def _fork(st: dict, ids, node_tokens: dict, left: int) -> dict:
    """A copy of ``st`` forked at its current end, the way the tree rollout names nodes."""
    at = len(st["resp"])
    if at > st["start"]:  # the open node up to the fork becomes shared
        node_tokens[st["path"][-1]] = at - st["start"]
        st["path"].append(next(ids))
        st["start"] = at
    return dict(
        resp=list(st["resp"]),
        mask=list(st["mask"]),
        lp=list(st["lp"]),
        path=st["path"][:-1] + [next(ids)],
        start=at,
        left=left,
        kind="branch",
    )


def _advantages(tree, mode: str, seed: int):
    rng = random.Random(seed)
    trajs, node_tokens = tree.trajectories, tree.node_tokens
    rewards = [rng.choice([-1.0, 0.0, 0.5, 1.0]) for _ in trajs]
    seq = group_advantages(rewards, [t.prompt_index for t in trajs])
    paths = [[(n, node_tokens[n]) for n in t.path] for t in trajs]
    return token_advantages(seq, paths, mode)


def _unshared(tree):
    """The same trajectories, each a node of its own: only their prompts are shared."""
    return assemble_tree(
        [
            Response(t.prompt_index, t.prompt_ids, t.response_ids, t.loss_mask, t.logprobs)
            for t in tree.trajectories
        ]
    )


class _Recorder(torch.optim.SGD):
    """SGD that keeps the gradient of every step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def _run(model, tree, adv, lr=0.0, dist=None, kl_model=None, **cfg):
    """One update of a copy of ``model``: (metrics, each step's gradients, the updated copy)."""
    model = copy.deepcopy(model)
    recorder = []
    optimizer = MasterWeights(
        model.parameters(), lambda ps: recorder.append(_Recorder(ps, lr)) or recorder[0]
    )
    metrics = update(
        model,
        optimizer,
        UpdateData(tree, adv),
        UpdateConfig(**cfg),
        dist=dist,
        kl_model=copy.deepcopy(kl_model),
    )
    return metrics, recorder[0].grads, model


def _per_token(model, tree, attention="sdpa", context=True):
    """Packed and per-trajectory log-probs of every model-written token of every trajectory."""
    trajs, node_tokens = tree.trajectories, tree.node_tokens
    device = next(model.parameters()).device
    with torch.no_grad(), attention_implementation(model, "sdpa", packed=False):
        batch = pack(trajs, list(range(len(trajs))), 0, device)
        plain = token_logprobs(model, batch, 1.0)[0].split([len(t.response_ids) for t in trajs])
    packed = {}
    with torch.no_grad(), attention_implementation(model, attention, packed=True):
        cache = ContextCache(LogprobModel(model), 1.0, attention, trainable=False)
        for tb in pack_trees(
            tree,
            [torch.zeros(len(t.response_ids)) for t in trajs],
            range(len(trajs)),
            budget=48,
            context=context,
        ):
            tb = tb.to(device)
            lp = tree_logprobs(model, tb, 1.0, attention, cache.kv(tb))[0]
            cache.done(tb)
            packed.update({tuple(o): v for o, v in zip(tb.origin.tolist(), lp)})
        assert not cache.live
    first = {}
    for i, t in enumerate(trajs):
        for n in t.path:
            first.setdefault(n, i)
    got, want = [], []
    for i, t in enumerate(trajs):
        offset = 0
        for n in t.path:
            for k in range(offset, offset + node_tokens[n]):
                if t.loss_mask[k]:
                    got.append(packed[(first[n], k)])
                    want.append(plain[i][k])
            offset += node_tokens[n]
    return torch.stack(got), torch.stack(want)


@pytest.mark.parametrize("kind,context", [(kind, True) for kind in ARCHS] + [("qwen2", False)])
def test_packed_log_probs_equal_per_trajectory(kind, context):
    """With budgets of 48 tokens every tree is split: its groups attend to the prompt context run
    once (``context``), or each lays out the prompt again."""
    model = tiny_model(kind)
    tree = random_rollout(seed=1)
    trajs = tree.trajectories
    got, want = _per_token(model, tree, context=context)
    assert len(got) == sum(sum(t.loss_mask) for t in trajs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


CASES = [  # (model, attribution, settings); budgets of 48 tokens split every tree
    ("qwen2", "soft", dict(mini_batch_prompts=1, micro_batch_tokens=48)),
    ("llama", "hard", dict(mini_batch_prompts=2, micro_batch_tokens=48, dual_clip=0.0)),
    (
        "qwen2",
        "hard",
        dict(mini_batch_prompts=1, micro_batch_tokens=10_000, entropy_coef=0.05, rollout_is_cap=2.0),
    ),
    ("llama", "soft", dict(mini_batch_prompts=3, micro_batch_tokens=64, rollout_is_cap=1.5)),
    ("qwen3", "soft", dict(mini_batch_prompts=1, micro_batch_tokens=64, kl_coef=0.5)),
]


@pytest.mark.parametrize("kind,mode,settings", CASES)
def test_packed_update_equals_per_trajectory_update(kind, mode, settings):
    """Loss, metrics and each optimizer step's gradient, with the policy moving between
    mini-batches (large SGD steps, tight clips) so that clipping and dual clip take part."""
    model = tiny_model(kind, seed=3)
    tree = random_rollout(seed=4, prompts=3, initial=2)
    adv = _advantages(tree, mode, seed=5)
    cfg = dict(clip_low=0.02, clip_high=0.03, dual_clip=1.05, grad_clip=0.0, lr=0.2)
    cfg.update(settings)
    lr = cfg.pop("lr")
    kl_model = tiny_model(kind, seed=33) if cfg.get("kl_coef") else None  # the KL's other policy
    packed, g_packed, m_packed = _run(model, tree, adv, lr=lr, kl_model=kl_model, **cfg)
    plain, g_plain, m_plain = _run(model, tree, adv, lr=lr, kl_model=kl_model, packed_update=False, **cfg)
    assert ("kl" in plain) == bool(kl_model) and plain.get("kl", 1.0) > 0
    assert packed["optimizer_steps"] == plain["optimizer_steps"] == math.ceil(3 / cfg["mini_batch_prompts"])
    assert packed["forward_tokens"] < plain["forward_tokens"]
    for key in plain:
        if key != "forward_tokens":
            assert packed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
    if plain["optimizer_steps"] > 1:  # the moved policy is clipped in later mini-batches
        assert plain["clip_fraction"] > 0 and (not cfg["dual_clip"] or plain["dual_clip_fraction"] > 0)
    for step_packed, step_plain in zip(g_packed, g_plain, strict=True):
        for a, b in zip(step_packed, step_plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(m_packed.parameters(), m_plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_without_node_sizes_only_the_prompt_is_shared_and_the_update_is_the_same():
    model = tiny_model("qwen2")
    tree = random_rollout(seed=6)
    adv = _advantages(tree, "soft", seed=7)
    with_nodes, g1, _ = _run(model, tree, adv)
    prompt_only, g2, _ = _run(model, _unshared(tree), adv)
    assert with_nodes["forward_tokens"] < prompt_only["forward_tokens"]
    assert with_nodes["loss"] == pytest.approx(prompt_only["loss"], rel=1e-5, abs=1e-7)
    for a, b in zip(g1[0], g2[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _OneRankOfMany:
    """A ``distributed.Dist`` stand-in for one process whose peers run one micro-batch more per
    mini-batch: the update pads with stand-ins that count for nothing."""

    world = 1

    def sum(self, values):
        return list(values)

    def max(self, values):
        return [v + 1 for v in values]


@pytest.mark.parametrize("packed_update,budget", [(True, 16384), (False, 16384), (True, 48)])
def test_stand_in_micro_batches_change_nothing(packed_update, budget):
    """Stand-in micro-batches, and with split trees (48-token rows) the prompt contexts run up
    front with stand-in context runs beside them, as under torchrun: the same update."""
    model = tiny_model("qwen2")
    tree = random_rollout(seed=26)
    adv = _advantages(tree, "soft", seed=27)
    cfg = dict(mini_batch_prompts=2, packed_update=packed_update, micro_batch_tokens=budget, kl_coef=0.1)
    kl_model = tiny_model("qwen2", seed=5)
    alone, g1, _ = _run(model, tree, adv, lr=0.2, kl_model=kl_model, **cfg)
    padded, g2, _ = _run(model, tree, adv, lr=0.2, dist=_OneRankOfMany(), kl_model=kl_model, **cfg)
    assert padded == pytest.approx(alone)
    for a, b in zip(g1[-1], g2[-1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("budget", [16384, 48])
def test_activation_checkpointing_gives_the_same_gradients(budget):
    """Whole trees, and split ones whose prompt context's gradients go back through its one
    checkpointed run."""
    model = tiny_model("llama")
    tree = random_rollout(seed=8)
    adv = _advantages(tree, "soft", seed=9)
    _, plain, _ = _run(model, tree, adv, gradient_checkpointing="false", micro_batch_tokens=budget)
    _, checkpointed, _ = _run(model, tree, adv, gradient_checkpointing="true", micro_batch_tokens=budget)
    for a, b in zip(plain[0], checkpointed[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _visible(batch) -> torch.Tensor:
    """bool [T, C + T]: which keys (the prompt contexts', then the row's) each row query sees."""
    return tree_mask(batch.subtree_end, "sdpa", batch.context_lo, batch.context_hi)[0, 0]


def _keys(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and positions of a row's keys: its prompt contexts' (positions from 0), then its own."""
    ids = [c.input_ids for c in batch.contexts] + [batch.input_ids]
    positions = [torch.arange(c.tokens) for c in batch.contexts] + [batch.position_ids]
    return torch.cat(ids), torch.cat(positions)


@pytest.mark.parametrize("budget,context", [(10_000, True), (30, True), (30, False), (1, True)])
def test_every_query_sees_exactly_its_own_path(budget, context):
    """For every token of every packed row: the keys it sees (prompt contexts included) are, in
    order, one token per position 0..its own, and read as a prompt and response prefix of a
    trajectory through it; for a predicted token, exactly its trajectory's tokens before it. A
    split tree's prompt goes through the model once with ``context``."""
    tree = random_rollout(seed=10, prompts=4, initial=3, fork=0.8)
    trajs = tree.trajectories
    batches = pack_trees(
        tree, [torch.zeros(len(t.response_ids)) for t in trajs], range(len(trajs)), budget, context=context
    )
    texts = {tuple(t.prompt_ids + t.response_ids) for t in trajs}
    trees = build_trees(tree, range(len(trajs)))
    unique = sum(len(tr.prompt) + sum(n.length for n in tr.nodes[1:]) for tr in trees)
    contexts = {id(c): c.tokens for b in batches for c in b.contexts}
    run = sum(b.tokens for b in batches) + sum(contexts.values())  # each context runs once
    assert run >= unique
    assert bool(contexts) == (context and budget < 10_000)
    if budget == 30:
        assert run > unique  # trees were split: each group lays out the prompt's last token at least
        if context:  # the rest of the prompt is not repeated
            assert sum(b.tokens for b in batches) < run - sum(len(tr.prompt) - 1 for tr in trees) + unique
        longest = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
        assert all(b.tokens <= max(budget, longest) for b in batches)
    for b in batches:
        visible, (ids, positions) = _visible(b), _keys(b)
        for i in range(b.tokens):
            keys = visible[i].nonzero().flatten()
            assert positions[keys].tolist() == list(range(int(b.position_ids[i]) + 1))
            prefix = tuple(ids[keys].tolist())
            assert any(text[: len(prefix)] == prefix for text in texts)
        for (t, k), h, target in zip(b.origin.tolist(), b.hidden_index.tolist(), b.targets.tolist()):
            keys = visible[h].nonzero().flatten()
            assert ids[keys].tolist() == trajs[t].prompt_ids + trajs[t].response_ids[:k]
            assert target == trajs[t].response_ids[k]
        by_path = torch.zeros_like(visible)  # what the CPU's sdpa runs
        for keys, queries, mask in path_masks(b.path_keys, b.path_sizes, b.context_tokens):
            assert not by_path[queries].any()  # each row position is the query of one path
            by_path[queries[:, None], keys[None, :]] = mask
        assert torch.equal(by_path, visible)
    counted = sum(int(b.copies.count.sum()) for b in batches)
    assert counted == sum(sum(t.loss_mask) for t in trajs)  # each copy's loss counted once


def test_rows_of_independent_sequences_for_the_varlen_kernels():
    tree = random_rollout(seed=11)
    trajs = tree.trajectories
    batches = pack_trees(
        tree, [torch.zeros(len(t.response_ids)) for t in trajs], range(len(trajs)), 60, share=False
    )
    assert sum(len(b.piece_starts) - 1 for b in batches) == len(trajs)
    for b in batches:
        i = torch.arange(b.tokens)
        doc = torch.bucketize(i, torch.tensor(b.piece_starts[1:]), right=True)
        causal = (i[None, :] <= i[:, None]) & (doc[None, :] == doc[:, None])
        assert torch.equal(_visible(b), causal)


@pytest.mark.parametrize("kind", ARCHS)
def test_packed_flex_attention_gives_the_per_trajectory_logprobs(kind):
    """The packed rows' flex_attention (our block mask and positions, through the model's attention
    interface) gives the per-trajectory log-probs (forward only, eager: the CPU has no flex
    backward)."""
    tree = random_rollout(seed=12, prompts=3)
    with warnings.catch_warnings():  # flex_attention uncompiled says it is slow
        warnings.simplefilter("ignore")
        got, want = _per_token(tiny_model(kind), tree, "flex_attention")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _dense_blocks(num: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(indices.shape[-2:], dtype=torch.bool)
    for q, (n, row) in enumerate(zip(num[0, 0].tolist(), indices[0, 0])):
        dense[q, row[:n]] = True
    return dense


@pytest.mark.parametrize("block", [128, 16])
def test_tree_block_mask_is_the_one_create_block_mask_finds(block):
    """The block mask worked out from per-block bounds equals, tensor for tensor, the one
    ``create_block_mask`` builds by evaluating every (query, key) pair, on rows of many lengths (a
    multiple of the block too), whole and split trees. With prompt contexts in front of the row its
    whole blocks are the same and its partial ones may be more (each then goes through the mask)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lengths, with_context = set(), 0
    for seed, budget in itertools.product(range(3), (10_000, 300, 60)):
        tree = random_rollout(seed=40 + seed, prompts=4, initial=3, fork=0.8)
        trajs = tree.trajectories
        rows = pack_trees(tree, [torch.zeros(len(t.response_ids)) for t in trajs], range(len(trajs)), budget)
        causal = torch.full((2 * block,), 2 * block)  # one causal row, a whole number of blocks
        for end, lo_c, hi_c in [(b.subtree_end, b.context_lo, b.context_hi) for b in rows] + [
            (causal, None, None)
        ]:
            lo, hi = key_bounds(end, lo_c, hi_c)
            T, K = end.numel(), lo.numel()
            lengths.add(T)
            got = tree_block_mask(lo, hi, T, block)
            want = create_block_mask(
                lambda b, h, q, kv: (lo[kv] <= q) & (q < hi[kv]),
                1,
                None,
                T,
                K,
                device="cpu",
                BLOCK_SIZE=block,
            )
            assert got.seq_lengths == want.seq_lengths and got.BLOCK_SIZE == want.BLOCK_SIZE
            if K == T:
                for a, b in zip(got.as_tuple(), want.as_tuple()):
                    if isinstance(a, torch.Tensor):
                        assert torch.equal(a, b), (T, block)
                continue
            with_context += 1
            full = _dense_blocks(got.full_kv_num_blocks, got.full_kv_indices)
            assert torch.equal(full, _dense_blocks(want.full_kv_num_blocks, want.full_kv_indices))
            partial = _dense_blocks(got.kv_num_blocks, got.kv_indices)
            assert (partial | ~_dense_blocks(want.kv_num_blocks, want.kv_indices)).all()
    assert len(lengths) > 10 and with_context


def test_packed_flex_attention_is_compiled_once_for_rows_of_any_length(monkeypatch):
    """The compiled flex_attention of the packed rows serves rows of every length without
    compiling again (a compile per new micro-batch length would cost seconds each on a GPU): a
    graph for rows of one block and one for longer rows, each for rows without and with prompt
    contexts in front. A counting torch.compile backend stands in for inductor on the CPU."""
    from arpo_fast.train import attention

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setitem(attention.FLEX_COMPILE, "cpu", counting)
    monkeypatch.setattr(attention, "_compiled_flex", {})
    torch._dynamo.reset()
    model, rows = tiny_model("qwen2"), []
    with torch.no_grad(), attention_implementation(model, "flex_attention", packed=True):
        cache = ContextCache(LogprobModel(model), 1.0, "flex_attention", trainable=False)
        for seed, budget in itertools.product(range(2), (700, 150)):
            tree = random_rollout(seed=50 + seed, prompts=8, initial=4, fork=0.8)
            trajs = tree.trajectories
            for b in pack_trees(
                tree, [torch.zeros(len(t.response_ids)) for t in trajs], range(len(trajs)), budget
            ):
                rows.append((b.tokens, b.context_tokens))
                tree_logprobs(model, b, 1.0, "flex_attention", cache.kv(b))
                cache.done(b)
    torch._dynamo.reset()
    assert len(set(rows)) >= 20 and any(t <= 128 for t, _ in rows) and any(c for _, c in rows)
    assert len(graphs) <= 4, (sorted(rows), len(graphs))


def test_a_node_holding_other_tokens_is_refused():
    trajs, node_tokens = random_responses(seed=13, fork=1.0)
    shared = next(i for i, t in enumerate(trajs) if t.kind == "branch")
    trajs[shared].response_ids[0] = (trajs[shared].response_ids[0] + 1) % VOCAB
    with pytest.raises(ValueError, match="holds other tokens"):
        assemble_tree(trajs, node_tokens)


@pytest.mark.parametrize("dual_clip", [3.0, 1.1, None])
def test_the_shared_loss_is_the_sum_over_copies(dual_clip):
    n, copies = 97, 5
    logprobs = (torch.randn(n) * 0.3).requires_grad_()
    old = logprobs.detach() + torch.randn(n) * 0.4
    adv = torch.randn(copies, n)
    adv[:, :7] = adv[:1, :7]  # hard attribution: one value for every copy
    adv[1:3, 10:20] = 0.0
    entropy = torch.rand(n)
    expand = lambda x: x[None].expand(copies, n)  # noqa: E731
    want, want_m = policy_loss(
        expand(logprobs),
        expand(old),
        adv,
        torch.ones(copies, n),
        0.2,
        0.28,
        dual_clip,
        entropy=expand(entropy),
        entropy_coef=0.01,
    )
    got, got_m = shared_policy_loss(
        logprobs, old, CopyAdvantages.of(adv), 0.2, 0.28, dual_clip, entropy=entropy, entropy_coef=0.01
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(*(torch.autograd.grad(x, logprobs)[0] for x in (got, want)))
    assert got_m == pytest.approx(want_m)
    assert want_m["clip_fraction"] > 0 and (dual_clip != 1.1 or want_m["dual_clip_fraction"] > 0)


def _fp64_gradient(model, trajs, adv):
    """The first mini-batch's gradient in float64, one trajectory at a time (old = current)."""
    from arpo_fast.kernels import logprob_entropy_ref

    model = copy.deepcopy(model).double()
    device = next(model.parameters()).device
    lps = []
    for t in trajs:
        ids = torch.tensor([t.prompt_ids + t.response_ids], device=device)
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        start = len(t.prompt_ids) - 1
        lps.append(
            logprob_entropy_ref(
                hidden[start : start + len(t.response_ids)],
                model.lm_head.weight,
                torch.tensor(t.response_ids, device=device),
            )[0]
        )
    lp = torch.cat(lps)
    mask = torch.tensor([m for t in trajs for m in t.loss_mask], dtype=torch.bool, device=device)
    loss, _ = policy_loss(lp[None], lp.detach()[None], torch.cat(adv).double().to(device)[None], mask[None])
    loss.backward()
    return lp.detach(), [p.grad for p in model.parameters()]


def _bf16_check(model, tree, adv, attention="sdpa"):
    """The tolerance rule against float64 for the packed update in bf16, the per-trajectory update
    in bf16 as the reference: the log-probs, and one mini-batch's gradient (old = current)."""
    trajs = tree.trajectories
    lp64, grad64 = _fp64_gradient(model, trajs, adv)
    mask = torch.tensor([m for t in trajs for m in t.loss_mask], dtype=torch.bool, device=lp64.device)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    got, want = _per_token(model16, tree, attention)
    grads = [
        torch.cat(
            [
                g.flatten()
                for g in _run(
                    model16,
                    tree,
                    adv,
                    packed_update=packed,
                    attn_implementation=attention if packed else "sdpa",
                )[1][0]
            ]
        )
        for packed in (True, False)
    ]
    assert_rule(
        [got, grads[0]],
        [want, grads[1]],
        [lp64[mask], torch.cat([g.flatten() for g in grad64])],
        floor=1e-6,
        names=["log-probs", "gradient"],
    )


def test_bf16_is_within_twice_the_per_trajectory_error():
    tree = random_rollout(seed=15, prompts=2)
    _bf16_check(tiny_model("qwen2", seed=14), tree, _advantages(tree, "soft", seed=16))


def test_auto_attention_per_device():
    assert resolve_attention("auto", True, torch.device("cpu")) == "sdpa"
    assert resolve_attention("auto", True, torch.device("cuda")) == "flex_attention"
    assert resolve_attention("auto", False, torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="tree's mask"):
        resolve_attention("flash_attention_2", True, torch.device("cuda"))
    with pytest.raises(ValueError, match="one of"):
        UpdateConfig(attn_implementation="xformers")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        UpdateConfig(gradient_checkpointing="sometimes")


@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_flex_attention_update_with_prompt_contexts_matches_per_trajectory_on_the_cpu(
    checkpointing, monkeypatch
):
    """The packed rows' flex_attention path, forward and backward, with split trees whose groups
    attend to their prompt context: eager flex_attention on the CPU (torch refuses its CPU backward
    up front; its eager reference is device-agnostic, so the check is lifted here) gives the
    per-trajectory update's loss and gradients."""
    import torch.nn.attention.flex_attention as flex

    if not hasattr(flex, "_validate_device"):
        pytest.skip("this torch checks flex_attention's device elsewhere")
    monkeypatch.setattr(flex, "_validate_device", lambda *args, **kwargs: None)
    model = tiny_model("qwen2", seed=17)
    tree = random_rollout(seed=18, prompts=3)
    adv = _advantages(tree, "soft", seed=19)
    cfg = dict(
        mini_batch_prompts=2, micro_batch_tokens=48, grad_clip=0.0, gradient_checkpointing=checkpointing
    )
    with warnings.catch_warnings():  # flex_attention uncompiled says it is slow
        warnings.simplefilter("ignore")
        packed, g1, _ = _run(model, tree, adv, lr=0.2, attn_implementation="flex_attention", **cfg)
    plain, g2, _ = _run(model, tree, adv, lr=0.2, packed_update=False, **cfg)
    assert packed["forward_tokens"] < plain["forward_tokens"]
    assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-6)
    for step1, step2 in zip(g1, g2, strict=True):
        for a, b in zip(step1, step2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flex_attention", "sdpa"])
def test_packed_update_on_cuda_matches_per_trajectory(attention):
    """fp32 on the GPU: the packed update under flex_attention (and sdpa per path), with activation
    checkpointing (the CUDA default), equals the per-trajectory update; several mini-batches and
    split trees."""
    model = tiny_model("qwen2", seed=17).cuda()
    tree = random_rollout(seed=18, prompts=3)
    adv = _advantages(tree, "soft", seed=19)
    cfg = dict(mini_batch_prompts=2, micro_batch_tokens=48, grad_clip=0.0)
    packed, g1, _ = _run(model, tree, adv, lr=0.2, attn_implementation=attention, **cfg)
    plain, g2, _ = _run(model, tree, adv, lr=0.2, packed_update=False, attn_implementation="sdpa", **cfg)
    assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-6)
    for step1, step2 in zip(g1, g2, strict=True):
        for a, b in zip(step1, step2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_bf16_flex_attention_is_within_twice_the_per_trajectory_error():
    tree = random_rollout(seed=23, prompts=2)
    _bf16_check(
        tiny_model("llama", seed=25).cuda(),
        tree,
        _advantages(tree, "soft", seed=24),
        attention="flex_attention",
    )


@pytest.mark.gpu
def test_flash_varlen_rows_match_padded_rows():
    pytest.importorskip("flash_attn")
    model = tiny_model("llama", seed=20).to(torch.bfloat16).cuda()
    tree = random_rollout(seed=21, prompts=3)
    adv = _advantages(tree, "soft", seed=22)
    varlen, _, _ = _run(model, tree, adv, packed_update=False, attn_implementation="flash_attention_2")
    padded, _, _ = _run(model, tree, adv, packed_update=False, attn_implementation="sdpa")
    assert varlen["forward_tokens"] < padded["forward_tokens"]
    assert varlen["loss"] == pytest.approx(padded["loss"], rel=2e-2, abs=1e-3)

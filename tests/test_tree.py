"""ARPO tree rollout: tool calls, result tokens, branching, budget, fills, limits, determinism.

Most tests drive the rollout with a scripted engine: each sequence writes a planned text, one segment
per tool round, with entropies the test chooses, so every branch decision is known in advance
(threshold 1 always branches, threshold 0 with a falling entropy never does). The last tests run the
real paged engine on a tiny random model.
"""

import math
import random
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from helpers import Calculator

from arpo_fast.engine import Engine, StepOutput
from arpo_fast.rollout import Protocol, ProtocolConfig
from arpo_fast.rollout.tree import ARPOConfig, arpo_rollout
from arpo_fast.seeds import child_seed
from arpo_fast.train.demo import demo_model

CALL = "<python>print(1+1)</python>"
ANSWER = "<answer>\\boxed{2}</answer>"


class ScriptedEngine:
    """Engine stand-in. A sequence writes ``plan(seed)[r]`` in tool round r (then EOS), with
    entropy ``entropy(seed, r, i)`` at its i-th token of the round; it records what it was given."""

    def __init__(self, tok, plan, entropy=lambda seed, r, i: 1.0, fail_at_step=None):
        self.tok, self.plan, self.entropy = tok, plan, entropy
        self.vocab_size = len(tok)
        self.seqs, self.next_id, self.steps, self.fail_at_step = {}, 0, 0, fail_at_step
        self.finished = {}  # seq -> tokens at free time

    def _new(self, seed, tokens, marks):
        self.seqs[self.next_id] = {"seed": seed, "tokens": tokens, "marks": marks, "forks": 0}
        self.next_id += 1
        return self.next_id - 1

    def add(self, prompt, seed=0):
        return self._new(seed, list(prompt), ["p"] * len(prompt))

    def extend(self, seq, ids):
        s = self.seqs[seq]
        s["tokens"] += ids
        s["marks"] += ["x"] * len(ids)

    def fork(self, seq, n, at=None):
        s = self.seqs[seq]
        at = len(s["tokens"]) if at is None else at
        kids = [
            self._new(child_seed(s["seed"], s["forks"] + j), s["tokens"][:at], s["marks"][:at])
            for j in range(n)
        ]
        s["forks"] += n
        return kids

    def free(self, seq):
        self.finished[seq] = self.seqs.pop(seq)["tokens"]

    def _next(self, s):
        marks = s["marks"]
        rounds = sum(1 for a, b in zip(marks, marks[1:]) if a == "m" and b == "x")
        i = 0  # model tokens since the last tool result (or the prompt)
        while i < len(marks) and marks[-1 - i] == "m":
            i += 1
        plan = self.plan(s["seed"])
        ids = self.tok.encode(plan[rounds]) + [self.tok.eos_token_id] if rounds < len(plan) else []
        token = ids[i] if i < len(ids) else self.tok.eos_token_id
        return token, self.entropy(s["seed"], rounds, i)

    def step(self, seqs, params=None, top_entropy=None):
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("scripted failure")
        tokens, ents = [], []
        for seq in seqs:
            s = self.seqs[seq]
            token, ent = self._next(s)
            s["tokens"].append(token)
            s["marks"].append("m")
            tokens.append(token)
            ents.append(ent)
        n = len(seqs)
        top = None  # the scripted top-10 entropy is the scripted entropy halved
        if top_entropy is not None:
            top = torch.tensor([e / 2 if w else float("nan") for e, w in zip(ents, top_entropy)])
        return StepOutput(
            torch.tensor(tokens),
            torch.full((n,), -0.5),
            torch.tensor(ents),
            torch.ones(n, dtype=torch.bool),
            top,
        )


class Tools:
    """Executor stand-in: runs the python-tool double (its answer without print's newline, after
    ``delay(query)`` seconds) on a thread of its own per call, and records the calls."""

    def __init__(self, delay=lambda query: 0.0):
        self.calls, self.tool = [], Calculator(delay, end="")

    def submit(self, name, query, delay=0.0):
        self.calls.append((name, query))
        future = Future()

        def answer():  # an error in the double fails the test instead of hanging it
            try:
                time.sleep(delay)
                future.set_result(self.tool(query))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)

        threading.Thread(target=answer).start()
        return future


def _run(
    tok,
    plan,
    config,
    entropy=lambda seed, r, i: 1.0,
    tools=None,
    seed=0,
    prompts=None,
    max_calls=3,
    stop_at_answer=True,
    **engine_kw,
):
    engine = ScriptedEngine(tok, plan, entropy, **engine_kw)
    protocol = Protocol(
        tok,
        ProtocolConfig(max_calls=max_calls, stop_at_answer=stop_at_answer),
        eos_token_ids=[tok.eos_token_id],
    )
    prompts = prompts or [tok.encode("Problem: what is 1 + 1?\n"), tok.encode("Problem: 2?\n")]
    out = arpo_rollout(engine, protocol, prompts, config, executor=tools or Tools(), seed=seed)
    return out, engine, prompts


def _text(tok, ids):
    return tok.decode(ids)


def test_answers_without_tools_then_fill_the_budget(tok):
    out, engine, prompts = _run(tok, lambda s: [ANSWER], ARPOConfig(rollouts=5, initial=2))
    assert len(out.trajectories) == 10
    for p in range(2):
        kinds = [t.kind for t in out.trajectories if t.prompt_index == p]
        assert kinds == ["initial"] * 2 + ["fill"] * 3
    for t in out.trajectories:
        assert t.finish_reason == "answer" and t.loss_mask == [1] * len(t.response_ids)
        assert _text(tok, t.response_ids) == ANSWER
        assert len(t.path) == 1 and out.node_tokens[t.path[0]] == len(t.response_ids)
    assert out.stats["fills"] == 6 and out.stats["branch_points"] == 0
    assert not engine.seqs  # everything freed


def test_tool_result_is_appended_with_mask_zero(tok):
    tools = Tools()
    out, engine, prompts = _run(
        tok,
        lambda s: [CALL, ANSWER],
        ARPOConfig(rollouts=1, initial=1),
        tools=tools,
        prompts=[tok.encode("Problem: 1 + 1\n")],
    )
    (t,) = out.trajectories
    result = tok.encode(" <result>\n2\n</result>")
    call = tok.encode(CALL)
    assert t.response_ids == call + result + tok.encode(ANSWER)
    assert t.loss_mask == [1] * len(call) + [0] * len(result) + [1] * len(tok.encode(ANSWER))
    assert t.logprobs[len(call) : len(call) + len(result)] == [0.0] * len(result)
    assert t.tool_calls == 1 and tools.calls == [("python", "print(1+1)")]
    # the engine saw exactly prompt + response
    assert engine.finished[0] == tok.encode("Problem: 1 + 1\n") + t.response_ids
    assert out.stats["tool_tokens"] == len(result)


def test_branch_forks_right_after_the_tool_result_and_shares_the_prefix(tok):
    cfg = ARPOConfig(rollouts=4, initial=2, branches=2, entropy_tokens=3, threshold=1.0)
    out, engine, prompts = _run(tok, lambda s: [CALL, ANSWER], cfg, prompts=[tok.encode("Q\n")])
    trajs = out.trajectories
    assert [t.kind for t in trajs].count("branch") == 2 and len(trajs) == 4
    assert out.stats["branch_points"] == 2 and out.stats["fills"] == 0
    prefix = len(tok.encode(CALL + " <result>\n2\n</result>"))
    for t in trajs:
        if t.kind == "branch":
            parent = trajs[t.parent]
            assert t.response_ids[:prefix] == parent.response_ids[:prefix]
            assert t.loss_mask[:prefix] == parent.loss_mask[:prefix]
            assert t.path[0] == parent.path[0] and t.path[1] != parent.path[1]
            assert out.node_tokens[t.path[0]] == prefix
            assert t.tool_calls == 1  # the call before the branch point counts for the copy too
        assert _text(tok, t.response_ids).endswith(ANSWER)
    paths = out.paths()
    for t, path in zip(trajs, paths):
        assert sum(n for _, n in path) == len(t.response_ids)
    assert not engine.seqs


def test_branch_budget_is_never_exceeded(tok):
    cfg = ARPOConfig(rollouts=3, initial=2, branches=4, entropy_tokens=2, threshold=1.0)
    out, _, _ = _run(tok, lambda s: [CALL, CALL, ANSWER], cfg)
    for p in range(2):
        assert sum(t.prompt_index == p for t in out.trajectories) == 3


def test_falling_entropy_never_branches_at_threshold_zero(tok):
    cfg = ARPOConfig(rollouts=4, initial=2, entropy_tokens=2, threshold=0.0, entropy_weight=1.0)
    entropy = lambda seed, r, i: 3.0 if r == 0 else 1.0  # noqa: E731 - lower after every result
    out, _, _ = _run(tok, lambda s: [CALL, ANSWER], cfg, entropy=entropy)
    assert out.stats["branch_points"] == 0
    assert [t.kind for t in out.trajectories].count("fill") == 4


def _branch_rate(tok, rise, **cfg_kw):
    """The share of initial trajectories that branch when every token after a tool result has
    entropy ``rise`` * ln V above the trajectory's first tokens (400 decisions, k = 2)."""
    import math

    log_v = math.log(len(tok))
    prompts = [tok.encode(f"P{i}\n") for i in range(200)]
    # room for both initial trajectories to branch; fills come only after they finish
    cfg = ARPOConfig(rollouts=4, initial=2, entropy_tokens=2, threshold=0.3, entropy_weight=1.0, **cfg_kw)
    entropy = lambda seed, r, i: 1.0 + (rise * log_v if r > 0 else 0.0)  # noqa: E731
    out, _, _ = _run(tok, lambda s: [CALL, ANSWER], cfg, entropy=entropy, prompts=prompts)
    trajs = out.trajectories
    parents = {t.parent for t in trajs if t.kind == "branch"}
    initial = [i for i, t in enumerate(trajs) if t.kind == "initial"]
    return len(parents & set(initial)) / len(initial)


def test_rising_entropy_raises_the_branch_rate(tok):
    """P(branch) = clip(threshold + weight * dH / ln V), dH of the mean entropy: measured over 400
    decisions."""
    rates = {rise: _branch_rate(tok, rise, entropy_reduce="mean") for rise in (0.0, 0.25)}
    assert abs(rates[0.0] - 0.3) < 0.08 and abs(rates[0.25] - 0.55) < 0.08


def test_by_default_the_entropies_of_the_k_tokens_are_summed(tok):
    """The reference's scale: dH sums the k tokens' entropies, so a rise of 0.125 ln V per token over
    k = 2 tokens raises P(branch) by 0.25 (the mean would raise it by 0.125)."""
    assert ARPOConfig().entropy_reduce == "sum"
    assert abs(_branch_rate(tok, 0.0) - 0.3) < 0.08
    assert abs(_branch_rate(tok, 0.125) - 0.55) < 0.08


def test_response_limit_ends_trajectories_and_truncates_results(tok):
    call = len(tok.encode(CALL))
    cfg = ARPOConfig(rollouts=1, initial=1, max_response_tokens=call + 3)
    out, engine, _ = _run(tok, lambda s: [CALL, ANSWER], cfg, prompts=[tok.encode("Q\n")])
    (t,) = out.trajectories
    assert t.finish_reason == "length" and len(t.response_ids) == call + 3
    assert t.loss_mask == [1] * call + [0] * 3
    assert not engine.seqs
    short = len(tok.encode(ANSWER)) - 1  # the answer does not fit
    cfg = ARPOConfig(rollouts=1, initial=1, max_response_tokens=short)
    (t,) = _run(tok, lambda s: [ANSWER], cfg, prompts=[tok.encode("Q\n")])[0].trajectories
    assert t.finish_reason == "length" and len(t.response_ids) == short


def test_call_limit_and_malformed_calls(tok):
    tools = Tools()
    cfg = ARPOConfig(rollouts=1, initial=1)
    (t,) = _run(
        tok, lambda s: [CALL, CALL, ANSWER], cfg, tools=tools, max_calls=1, prompts=[tok.encode("Q\n")]
    )[0].trajectories
    assert t.finish_reason == "limit" and len(tools.calls) == 1
    (t,) = _run(tok, lambda s: ["<python></python>", ANSWER], cfg, tools=tools, prompts=[tok.encode("Q\n")])[
        0
    ].trajectories
    assert len(tools.calls) == 1  # the empty call was not run; its error was read back
    text = _text(tok, t.response_ids)
    assert "<result>" in text and t.finish_reason == "answer"
    assert text != "<python></python> <result>\n\n</result>" + ANSWER


def test_same_seed_same_trees_whatever_the_tool_timing(tok):
    cfg = ARPOConfig(rollouts=6, initial=3, entropy_tokens=2, threshold=0.5)
    plan = lambda s: [CALL, CALL, ANSWER] if s % 2 else [CALL, ANSWER]  # noqa: E731
    entropy = lambda seed, r, i: (seed >> (r + i)) % 7 * 0.3  # noqa: E731
    runs = []
    for delay in (lambda query: 0.0, lambda query: random.random() * 0.01):
        out, _, _ = _run(tok, plan, cfg, entropy=entropy, tools=Tools(delay), seed=7)
        runs.append([(t.prompt_index, t.kind, t.parent, t.response_ids, t.path) for t in out.trajectories])
    assert runs[0] == runs[1]
    out, _, _ = _run(tok, plan, cfg, entropy=entropy, seed=8)
    assert [t.response_ids for t in out.trajectories] != [r[3] for r in runs[0]]


def test_an_engine_error_frees_every_sequence(tok):
    engine_box = {}

    class Failing(ScriptedEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            engine_box["e"] = self

    protocol = Protocol(tok, eos_token_ids=[tok.eos_token_id])
    engine = Failing(tok, lambda s: [CALL, ANSWER], fail_at_step=5)
    with pytest.raises(RuntimeError, match="scripted failure"):
        arpo_rollout(engine, protocol, [tok.encode("Q\n")], ARPOConfig(4, 2), executor=Tools())
    assert not engine.seqs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial": 0}, "initial"),
        ({"rollouts": 2, "initial": 3}, "initial"),
        ({"branches": 1}, "branches"),
        ({"entropy_tokens": 0}, "entropy_tokens"),
        ({"threshold": 1.5}, "threshold"),
        ({"entropy_weight": float("nan")}, "entropy_weight"),
        ({"max_response_tokens": 0}, "max_response"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ARPOConfig(**kwargs)


def test_real_engine_rollout_matches_the_training_forward(tok):
    """On the paged engine with a tiny random model: every sequence is freed, the pool is whole
    again, and each sampled token's log-prob equals the plain forward's (what the update uses)."""
    from arpo_fast.train.padded import pack, token_logprobs

    model = demo_model(tok, seed=3).eval()
    engine = Engine(model, tokenizer=tok, num_blocks=256)
    blocks = engine.free_blocks
    protocol = Protocol(tok, eos_token_ids=engine.eos_token_ids)
    prompts = [tok.encode("Problem: what is 3 * 4?\n"), tok.encode("Problem: 7 - 2\n")]
    cfg = ARPOConfig(rollouts=3, initial=2, max_response_tokens=6)  # the kernels run interpreted
    with torch.no_grad():
        out = arpo_rollout(engine, protocol, prompts, cfg, seed=1)
    assert len(out.trajectories) == 6 and not engine.live() and engine.free_blocks == blocks
    with torch.no_grad():
        batch = pack(out.trajectories, list(range(6)), tok.pad_token_id, "cpu")
        logprobs, entropy = token_logprobs(model, batch, 1.0)
    sampled = torch.tensor([lp for t in out.trajectories for lp in t.logprobs])
    ents = torch.tensor([e for t in out.trajectories for e in t.entropies])
    mask = batch.loss_mask
    torch.testing.assert_close(logprobs[mask], sampled[mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy[mask], ents[mask], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def warm_model(tok):
    """The demo model after a short warm start: it calls the (scripted) python tool and branches."""
    from arpo_fast.train.demo import warm_start

    model = demo_model(tok, seed=0)
    warm_start(model, tok, steps=80)
    return model


def test_preemption_in_a_small_pool_changes_no_trajectory(tok, warm_model, monkeypatch):
    """A pool too small for the tree makes the engine preempt and recompute; sampling depends only
    on (seed, position) and the logits, so the trees, branches included, are the same as with room
    to spare."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch paths: this test is about the engine
    model = warm_model
    from arpo_fast.train.demo import demo_problems

    protocol = Protocol(tok, eos_token_ids=[tok.eos_token_id])
    prompts = [tok.encode(row["prompt"]) for row in demo_problems(2)]
    cfg = ARPOConfig(rollouts=6, initial=3, entropy_tokens=4, threshold=1.0, max_response_tokens=48)
    trees = []
    for blocks, policy in ((512, "raise"), (14, "preempt")):
        engine = Engine(model, tokenizer=tok, num_blocks=blocks, block_size=8, on_pool_exhausted=policy)
        with torch.no_grad():
            out = arpo_rollout(
                engine, protocol, prompts, cfg, executor=Tools(), seed=6
            )  # a seed that branches
        trees.append([(t.kind, t.parent, t.response_ids, t.path) for t in out.trajectories])
        assert not engine.live()
    assert engine.stats["preemptions"] > 0
    assert any(kind == "branch" for kind, *_ in trees[0])
    assert trees[0] == trees[1]


def test_without_an_executor_a_call_reads_back_that_tools_are_unavailable(tok):
    engine = ScriptedEngine(tok, lambda s: [CALL, ANSWER])
    protocol = Protocol(tok, eos_token_ids=[tok.eos_token_id])
    out = arpo_rollout(engine, protocol, [tok.encode("Q\n")], ARPOConfig(1, 1))
    (t,) = out.trajectories
    assert "Tool 'python' is not available in this run." in _text(tok, t.response_ids)
    assert t.finish_reason == "eos" and not engine.seqs  # by default generation goes on to EOS


class OrderedTools(Tools):
    """The calculator double, its n-th submitted call taking ``delays[n]`` seconds."""

    def __init__(self, delays):
        super().__init__()
        self.pending = list(delays)

    def submit(self, name, query):
        return super().submit(name, query, self.pending.pop(0) if self.pending else 0.0)


def test_a_contested_budget_gives_the_same_tree_whoever_answers_first(tok):
    """One branch slot (M = 3, N = 2) that both initial trajectories want (threshold 1): which tool
    answers first must not decide who gets it."""
    cfg = ARPOConfig(rollouts=3, initial=2, entropy_tokens=2, threshold=1.0)
    trees = []
    for delays in ([0.3, 0.0], [0.0, 0.3], [0.1, 0.1]):
        out, _, _ = _run(
            tok,
            lambda s: [CALL, ANSWER],
            cfg,
            tools=OrderedTools(delays),
            prompts=[tok.encode("Q\n")],
            seed=3,
        )
        trees.append([(t.kind, t.parent, t.response_ids, t.path) for t in out.trajectories])
    assert trees[0] == trees[1] == trees[2]
    assert [kind for kind, *_ in trees[0]] == ["initial", "branch", "initial"]


def test_random_tool_delays_never_change_the_trees(tok):
    """Budgets contested within a lineage too (copies of copies), with random delays per call."""
    cfg = ARPOConfig(rollouts=8, initial=2, entropy_tokens=2, threshold=0.8)
    plan = lambda s: [CALL, CALL, CALL, ANSWER]  # noqa: E731
    entropy = lambda seed, r, i: (seed >> (r + i)) % 5 * 0.4  # noqa: E731
    runs = []
    for k in range(3):
        rng = random.Random(k)
        out, _, _ = _run(
            tok,
            plan,
            cfg,
            entropy=entropy,
            seed=11,
            prompts=[tok.encode("Q\n")] * 3,
            tools=OrderedTools([rng.random() * 0.02 for _ in range(200)]),
        )
        runs.append([(t.prompt_index, t.kind, t.parent, t.response_ids, t.path) for t in out.trajectories])
        assert out.stats["branch_points"] > 0
    assert runs[0] == runs[1] == runs[2]


def test_the_engine_takes_every_argument_the_rollout_engine_protocol_names():
    """The protocol states what the tree uses (``top_entropy`` included); the paged engine offers it."""
    import inspect

    from arpo_fast.rollout.engine_api import RolloutEngine

    calls = [n for n, m in vars(RolloutEngine).items() if callable(m) and not n.startswith("_")]
    assert {"add", "step", "extend", "fork", "free"} <= set(calls)
    for name in calls:
        want = list(inspect.signature(getattr(RolloutEngine, name)).parameters)
        assert list(inspect.signature(getattr(Engine, name)).parameters)[: len(want)] == want, name
    assert "top_entropy" in inspect.signature(RolloutEngine.step).parameters
    assert isinstance(Engine.vocab_size, property)


def test_shares_of_the_branch_budget():
    from arpo_fast.rollout.tree import _split

    assert _split(8, 8) == [1] * 8 and _split(3, 2) == [2, 1] and _split(1, 2) == [1, 0]
    assert _split(0, 3) == [0, 0, 0] and sum(_split(17, 5)) == 17


def test_by_default_trajectories_run_on_to_eos_past_the_answer(tok):
    """As in the reference: </answer> does not stop generation; EOS does, and is part of the response."""
    out, engine, _ = _run(
        tok,
        lambda s: [ANSWER + " more"],
        ARPOConfig(rollouts=1, initial=1),
        prompts=[tok.encode("Q\n")],
        stop_at_answer=False,
    )
    (t,) = out.trajectories
    assert t.finish_reason == "eos" and t.response_ids == tok.encode(ANSWER + " more") + [tok.eos_token_id]
    assert not engine.seqs


def test_a_call_past_the_limit_ends_with_a_model_written_eos(tok):
    tools = Tools()
    (t,) = _run(
        tok,
        lambda s: [CALL, CALL, ANSWER],
        ARPOConfig(rollouts=1, initial=1),
        tools=tools,
        max_calls=1,
        prompts=[tok.encode("Q\n")],
    )[0].trajectories
    assert t.finish_reason == "limit" and len(tools.calls) == 1
    assert t.response_ids[-1] == tok.eos_token_id and t.loss_mask[-1] == 1
    assert t.response_ids[:-1] == tok.encode(CALL) + tok.encode(" <result>\n2\n</result>") + tok.encode(CALL)
    assert math.isnan(t.logprobs[-1])  # not sampled: no rollout log-prob


def test_a_call_at_the_length_limit_is_neither_run_nor_counted(tok):
    tools = Tools()
    cfg = ARPOConfig(rollouts=1, initial=1, max_response_tokens=len(tok.encode(CALL)))
    out, _, _ = _run(tok, lambda s: [CALL, ANSWER], cfg, tools=tools, prompts=[tok.encode("Q\n")])
    assert out.trajectories[0].finish_reason == "length"
    assert tools.calls == [] and out.stats["tool_calls"] == 0


def test_reference_semantics_decide_at_the_call_from_the_segment_before_it(tok):
    """Under the reference's rule the first call is a coin flip (its segment is the baseline), a
    later call compares its own segment's top-10 entropy, and copies fork after the result."""
    import math as m

    log_v = m.log(len(tok))
    prompts = [tok.encode(f"P{i}\n") for i in range(200)]

    def rate(rise, plan):
        # the scripted top-10 entropy is half the scripted entropy: a rise of 2 * rise * ln V there
        entropy = lambda seed, r, i: 1.0 + (2 * rise * log_v if r > 0 else 0.0)  # noqa: E731
        cfg = ARPOConfig(
            rollouts=4,
            initial=2,
            entropy_tokens=2,
            threshold=0.3,
            entropy_weight=1.0,
            arpo_semantics="reference",
            entropy_reduce="mean",
        )
        out, _, _ = _run(tok, plan, cfg, entropy=entropy, prompts=prompts)
        trajs = out.trajectories
        initial = [i for i, t in enumerate(trajs) if t.kind == "initial"]
        for t in trajs:
            if t.kind == "branch":  # forked right after the first result, which it shares
                parent = trajs[t.parent]
                n = len(tok.encode(CALL + " <result>\n2\n</result>"))
                assert t.response_ids[:n] == parent.response_ids[:n] and t.loss_mask[n - 1] == 0
        return len({t.parent for t in trajs if t.kind == "branch"} & set(initial)) / len(initial)

    # one call: decided from the first segment, the baseline itself: tau whatever the entropy does
    assert abs(rate(0.25, lambda s: [CALL, ANSWER]) - 0.3) < 0.08
    # two calls, never branching at the first (threshold met only by the rise): the second decides
    # from the segment after the first result, 0.25 ln V higher on average
    two = rate(0.25, lambda s: [CALL, CALL, ANSWER])
    assert two > 0.3 + 0.2  # first call tau, then tau + 0.25 on what is left: 1 - 0.7 * 0.45
    assert abs(two - (1 - 0.7 * 0.45)) < 0.08


def test_reference_semantics_on_the_real_engine(tok, warm_model, monkeypatch):
    """The reference's rule asks the engine for top-10 entropies of each segment's first k tokens
    only; trees branch and every sequence is freed."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    engine = Engine(warm_model, tokenizer=tok, num_blocks=512, block_size=8)
    asked = []
    step = engine.step

    def spy(seqs, params=None, top_entropy=None):
        asked.append(sum(top_entropy))
        return step(seqs, params, top_entropy=top_entropy)

    engine.step = spy
    protocol = Protocol(tok, eos_token_ids=[tok.eos_token_id])
    cfg = ARPOConfig(
        rollouts=6,
        initial=3,
        entropy_tokens=4,
        threshold=1.0,
        max_response_tokens=48,
        arpo_semantics="reference",
    )
    from arpo_fast.train.demo import demo_problems

    with torch.no_grad():
        out = arpo_rollout(
            engine,
            protocol,
            [tok.encode(row["prompt"]) for row in demo_problems(2)],
            cfg,
            executor=Tools(),
            seed=5,
        )
    assert len(out.trajectories) == 12 and not engine.live() and out.stats["tool_calls"] > 0
    assert any(t.kind == "branch" for t in out.trajectories)
    assert 0 < sum(asked) < sum(len(t.response_ids) for t in out.trajectories)

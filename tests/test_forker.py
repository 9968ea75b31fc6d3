"""The native forker against its Python reference, in lockstep, plus every error it reports."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import arpo_fast
from arpo_fast.engine.forker_ref import PyKVForker
from arpo_fast.errors import PoolExhaustedError, UnknownSequenceError

_C = arpo_fast.native()
IMPLS = [_C.KVForker, PyKVForker]


def state(f, seqs):
    """Everything observable about a forker: per sequence (length, table), plus stats."""
    return [(f.length(s), list(f.block_table(s))) for s in seqs], f.stats()


def test_native_version_matches_package():
    assert _C.__version__ == arpo_fast.__version__


@pytest.mark.parametrize("impl", IMPLS)
def test_prepare_step_returns_slots_tables_lengths(impl):
    f = impl(32, 4)
    a, b = f.new_sequence(), f.new_sequence()
    meta = f.prepare_step(np.array([a, b]), np.array([6, 3]))
    ta, tb = f.block_table(a), f.block_table(b)
    expected = [ta[p // 4] * 4 + p % 4 for p in range(6)] + [tb[p // 4] * 4 + p % 4 for p in range(3)]
    assert meta.slot_mapping.dtype == np.int64 and meta.slot_mapping.tolist() == expected
    assert meta.block_tables.dtype == np.int32 and meta.block_tables.shape == (2, 2)
    assert meta.block_tables[1].tolist() == [tb[0], 0]
    assert meta.context_lens.dtype == np.int32 and meta.context_lens.tolist() == [6, 3]
    assert meta.copies.shape == (0, 2)
    assert f.prepare_step([a], [0], min_width=5).block_tables.shape == (1, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_fork_shares_prefix_and_copies_only_the_partial_tail(impl):
    f = impl(64, 4)
    p = f.new_sequence()
    f.append(p, 10)  # two full blocks + a tail holding 2
    kids = f.fork(p, 3)
    assert all(list(f.block_table(k)) == list(f.block_table(p)) for k in kids)
    assert f.stats()["used_blocks"] == 3 and f.stats()["shared_blocks"] == 3
    meta = f.prepare_step(kids + [p], [1, 1, 1, 1])
    # Three of the four holders of the tail copy it; the last writes in place. Full blocks never copy.
    assert len(meta.copies) == 3
    assert set(meta.copies[:, 0].tolist()) == {int(f.block_table(p)[2])}
    assert f.stats()["copies_made"] == 3
    f.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_pool_exhaustion_changes_nothing(impl):
    f = impl(6, 4)
    a, b = f.new_sequence(), f.new_sequence()
    f.append(a, 13)
    before = state(f, [a, b])
    with pytest.raises(PoolExhaustedError, match=r"needs 3 free blocks but only 2 of 6 are free"):
        f.append(b, 9)
    with pytest.raises(PoolExhaustedError, match=r"a step of 2 sequences and 12 new tokens needs"):
        f.prepare_step([a, b], [4, 8])
    assert state(f, [a, b]) == before
    f.check_invariants()


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_are_clear_and_change_nothing(impl):
    f = impl(8, 4)
    a = f.new_sequence()
    f.append(a, 5)
    before = state(f, [a])
    with pytest.raises(UnknownSequenceError, match="unknown sequence id 42 .never created"):
        f.append(42, 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        f.append(a, -1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        f.fork(a, -1)
    with pytest.raises(ValueError, match="at=6 is past the length 5"):
        f.fork(a, 1, 6)
    with pytest.raises(ValueError, match=r"outside \[0, 5\]"):
        f.truncate(a, 6)
    with pytest.raises(ValueError, match="appears twice"):
        f.prepare_step([a, a], [1, 1])
    with pytest.raises(ValueError, match="is negative"):
        f.prepare_step([a], [-3])
    with pytest.raises(ValueError, match="entries but new_tokens has"):
        f.prepare_step([a], [1, 2])
    with pytest.raises(UnknownSequenceError):
        f.prepare_step([a, 99], [1, 1])
    assert state(f, [a]) == before
    f.free(a)
    with pytest.raises(UnknownSequenceError, match="already freed"):
        f.length(a)
    with pytest.raises(UnknownSequenceError, match="already freed"):
        f.free(a)
    with pytest.raises(ValueError, match="power of two"):
        impl(8, 12)
    with pytest.raises(ValueError, match="num_blocks"):
        impl(0, 16)
    f.check_invariants()


def test_native_import_failure_says_how_to_rebuild(monkeypatch):
    import builtins
    import sys

    real_import = builtins.__import__

    def no_native(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "arpo_fast" and fromlist and "_C" in fromlist:
            raise ImportError("simulated: cannot open shared object file")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "arpo_fast._C", raising=False)
    monkeypatch.delattr(arpo_fast, "_C", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_native)
    with pytest.raises(ImportError, match=r"pip install -e \."):
        arpo_fast.native()


# -- lockstep property test ------------------------------------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["new", "append", "fork", "truncate", "free", "step", "take"]),
        st.integers(0, 10**6),
        st.integers(0, 40),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=60,
)


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as exc:  # both must fail the same way
        return (type(exc).__name__, str(exc))


def _norm(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):  # StepMetadata
        return [_norm(v) for v in value]
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, block_log=st.integers(0, 3), num_blocks=st.integers(1, 24))
def test_native_and_reference_agree_in_lockstep(ops, block_log, num_blocks):
    block_size = 1 << block_log
    fs = [_C.KVForker(num_blocks, block_size), PyKVForker(num_blocks, block_size)]
    live: list[int] = []
    for kind, pick, n, extra in ops:
        if kind == "new" or not live:
            ids = [f.new_sequence() for f in fs]
            assert ids[0] == ids[1]
            live.append(ids[0])
            continue
        seq = live[pick % len(live)]
        if kind == "append":
            calls = [lambda f=f: f.append(seq, n) for f in fs]
        elif kind == "fork":
            at = -1 if extra == 0 else pick % (fs[1].length(seq) + 2)  # sometimes one past: an error
            calls = [lambda f=f: f.fork(seq, extra, at) for f in fs]
        elif kind == "truncate":
            calls = [lambda f=f: f.truncate(seq, pick % (fs[1].length(seq) + 2)) for f in fs]
        elif kind == "free":
            calls = [lambda f=f: f.free(seq) for f in fs]
        elif kind == "step":
            batch = sorted({live[(pick + 7 * i) % len(live)] for i in range(extra + 1)})
            toks = [(n + i) % 9 for i in range(len(batch))]
            calls = [lambda f=f: f.prepare_step(batch, toks) for f in fs]
        else:
            calls = [lambda f=f: f.take_copies() for f in fs]
        native, ref = (_outcome(c) for c in calls)
        assert native[0] == ref[0], (native, ref)
        assert _norm(native[1]) == _norm(ref[1])
        if kind == "fork" and native[0] == "ok":
            live.extend(native[1])
        if kind == "free" and native[0] == "ok":
            live.remove(seq)
        for f in fs:
            f.check_invariants()
        assert state(fs[0], live) == state(fs[1], live)
    for f in fs:
        for s in live:
            f.free(s)
        f.check_invariants()
        assert f.stats()["free_blocks"] == num_blocks, "blocks leaked"
        assert f.stats()["used_blocks"] == 0

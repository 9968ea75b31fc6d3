"""Tool throughput: python-tool calls per second through the executor, search queries per second.

Python: every call starts a cold interpreter in the sandbox mode measured (bubblewrap, the launcher's
own namespaces, or a throw-away uid; each with its per-run cgroup where the machine allows); the
peer is a bare ``subprocess.run([python, "-c", code])`` with no limits and no sandbox, measured in
the same run.
Search: a deterministic synthetic corpus (default 100,000 documents, Zipf-distributed words) is
generated in a temporary directory, indexed once (build time reported), then queried through the
tool (BM25 + reading and formatting the snippets); the peer is bm25s's bare ``retrieve``.

    python benchmarks/bench_tools.py                 # everything, defaults
    python benchmarks/bench_tools.py --docs 20000 --calls 20
    python -m pytest benchmarks/bench_tools.py --benchmark-only   # small sizes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Section, add_output_args, emit, timed  # noqa: E402 - after sys.path is set

from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor  # noqa: E402 - after sys.path is set
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig  # noqa: E402 - after sys.path is set
from arpo_fast.rollout.tools.search import BM25Search, SearchConfig  # noqa: E402 - after sys.path is set

CODE = "import math\nprint(sum(math.isqrt(i) for i in range(10000)))"


def bench_python(calls: int, workers: int, mode: str) -> float:
    """Calls per second for ``calls`` distinct calls (no de-duplication) on ``workers`` threads."""
    tool = PythonTool(PythonToolConfig(sandbox=mode))
    assert tool.mode == mode, tool.mode
    with ToolExecutor({"python": tool}, ExecutorConfig(max_workers=workers)) as ex:
        ex.run("python", CODE)  # warm-up: probe, page cache
        results, elapsed = timed(
            lambda: [f.result() for f in [ex.submit("python", f"{CODE}\n# call {i}") for i in range(calls)]]
        )
    bad = [r for r in results if not r.ok]
    assert not bad, bad[0].text
    return calls / elapsed


def bare_subprocess() -> None:
    subprocess.run([sys.executable, "-c", CODE], capture_output=True, check=True)


def bench_bare_subprocess(calls: int) -> float:
    return calls / timed(lambda: [bare_subprocess() for _ in range(calls)])[1]


def make_corpus(path: str, docs: int, seed: int = 0) -> list[str]:
    """Write ``docs`` synthetic documents; return the vocabulary (for queries)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fu", "ge", "hi"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(30000)})
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]  # Zipf-like word frequencies
    with open(path, "w") as f:
        for i in range(docs):
            words = rng.choices(vocab, weights, k=rng.randint(30, 90))
            title = " ".join(rng.choices(vocab, weights, k=3))
            f.write(json.dumps({"id": f"doc{i}", "title": title, "text": " ".join(words)}) + "\n")
    return vocab


def search_queries(vocab: list[str], n: int) -> list[str]:
    rng = random.Random(1)
    mid = vocab[100:5000]  # neither the commonest words nor ones that never occur
    return [" ".join(rng.choices(mid, k=rng.randint(2, 5))) for _ in range(n)]


def query_tokens(tool: BM25Search, queries: list[str]) -> list[list[str]]:
    return [[w for w in q.split() if w in tool._vocab] for q in queries]


def bare_retrieve(tool: BM25Search, tokens: list[str]):
    """The peer: bm25s's own retrieve on the tool's index, without reading or formatting snippets."""
    return tool._retriever.retrieve([tokens], k=5, show_progress=False)


def bench_search(docs: int, queries: int, workdir: str) -> dict[str, float]:
    corpus = os.path.join(workdir, "corpus.jsonl")
    vocab = make_corpus(corpus, docs)
    tool, build_s = timed(lambda: BM25Search(SearchConfig(corpus_path=corpus, top_k=5, snippet_chars=1000)))
    _, load_s = timed(lambda: BM25Search(SearchConfig(corpus_path=corpus)))  # from the on-disk cache
    qs = search_queries(vocab, queries)
    for q in qs[:20]:
        tool(q)
    tool_qps = queries / timed(lambda: [tool(q) for q in qs])[1]
    tokens = query_tokens(tool, qs)
    bare_qps = queries / timed(lambda: [bare_retrieve(tool, t) for t in tokens])[1]
    return {"build_s": build_s, "load_s": load_s, "tool_qps": tool_qps, "bare_qps": bare_qps}


# -- pytest-benchmark entry points ---------------------------------------------------------------


@pytest.mark.parametrize("peer", ["executor", "bare_subprocess"])
def test_python_call(benchmark, peer):
    benchmark.group = "one python call (cold interpreter)"
    if peer == "bare_subprocess":
        benchmark.pedantic(bare_subprocess, rounds=5, warmup_rounds=1)
        return
    tool = PythonTool(PythonToolConfig())  # the best sandbox mode this machine allows
    with ToolExecutor({"python": tool}, ExecutorConfig(max_workers=1, dedup=False)) as ex:
        result = benchmark.pedantic(ex.run, args=("python", CODE), rounds=5, warmup_rounds=1)
    assert result.ok, result.text


@pytest.fixture(scope="module")
def search_index(tmp_path_factory):
    corpus = str(tmp_path_factory.mktemp("search") / "corpus.jsonl")
    vocab = make_corpus(corpus, 5000)
    tool = BM25Search(SearchConfig(corpus_path=corpus, top_k=5, snippet_chars=1000))
    return tool, search_queries(vocab, 200)


@pytest.mark.parametrize("peer", ["tool", "bare_retrieve"])
def test_search_queries(benchmark, search_index, peer):
    tool, qs = search_index
    tokens = query_tokens(tool, qs)
    fn = (
        (lambda: [tool(q) for q in qs])
        if peer == "tool"
        else (lambda: [bare_retrieve(tool, t) for t in tokens])
    )
    benchmark.group = "200 search queries, 5,000 generated documents, top 5"
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=40, help="python calls per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="executor pool sizes")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["bwrap", "namespaces", "uid"],
        help="python tool sandbox modes to measure (those that cannot work here are skipped)",
    )
    parser.add_argument("--docs", type=int, default=100_000, help="synthetic corpus size")
    parser.add_argument("--queries", type=int, default=1000, help="search queries to time")
    parser.add_argument("--skip-python", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    add_output_args(parser)
    args = parser.parse_args()
    section = Section(
        "Tools",
        f"Python: {args.calls} distinct calls per figure, each a cold interpreter in the sandbox mode "
        "named, through the executor; the peer is a bare `subprocess.run([python, '-c', code])`, "
        f"sequential, no limits. Search: {args.docs:,} generated documents (Zipf-distributed words), "
        f"indexed once, then {args.queries} queries through the tool (BM25, snippets read and "
        "formatted) against bm25s's bare `retrieve`.",
    )
    if not args.skip_python:
        python_rows(section, args)
    if not args.skip_search:
        with tempfile.TemporaryDirectory(prefix="arpo_bench_search_") as workdir:
            r = bench_search(args.docs, args.queries, workdir)
        t = section.table(f"search ({args.docs} docs)", "value")
        t.add("index build (tokenise + BM25 + save)", f"{r['build_s']:.1f} s")
        t.add("index load from disk cache", f"{r['load_s']:.2f} s")
        t.add("queries/s through the tool (top 5, snippets read from the corpus)", f"{r['tool_qps']:.0f}")
        t.add("queries/s, bare bm25s retrieve (peer)", f"{r['bare_qps']:.0f}")
    emit(section, args)


def python_rows(section: Section, args) -> None:
    t = section.table("python tool", "pool", "calls/s", formats={"calls/s": "{:.1f}"})
    t.add("bare subprocess (peer, sequential)", 1, bench_bare_subprocess(args.calls))
    for mode in args.modes:
        try:
            PythonTool(PythonToolConfig(sandbox=mode))
        except ValueError as exc:  # this mode cannot work here
            t.add(f"executor, {mode}", "-", f"unavailable: {exc}")
            continue
        for workers in args.workers:
            t.add(f"executor, sandbox={mode}", workers, bench_python(args.calls, workers, mode))


if __name__ == "__main__":
    main()

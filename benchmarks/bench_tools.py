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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

from arpo_fast.rollout.tools.executor import ExecutorConfig, ToolExecutor
from arpo_fast.rollout.tools.python_tool import PythonTool, PythonToolConfig
from arpo_fast.rollout.tools.search import BM25Search, SearchConfig

CODE = "import math\nprint(sum(math.isqrt(i) for i in range(10000)))"


def bench_python(calls: int, workers: int, mode: str) -> float:
    """Calls per second for ``calls`` distinct calls (no de-duplication) on ``workers`` threads."""
    tool = PythonTool(PythonToolConfig(sandbox=mode))
    assert tool.mode == mode, tool.mode
    with ToolExecutor({"python": tool}, ExecutorConfig(max_workers=workers)) as ex:
        ex.run("python", CODE)  # warm-up: probe, page cache
        start = time.perf_counter()
        futures = [ex.submit("python", f"{CODE}\n# call {i}") for i in range(calls)]
        results = [f.result() for f in futures]
        elapsed = time.perf_counter() - start
    bad = [r for r in results if not r.ok]
    assert not bad, bad[0].text
    return calls / elapsed


def bench_bare_subprocess(calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        subprocess.run([sys.executable, "-c", CODE], capture_output=True, check=True)
    return calls / (time.perf_counter() - start)


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


def bench_search(docs: int, queries: int, workdir: str) -> dict[str, float]:
    corpus = os.path.join(workdir, "corpus.jsonl")
    vocab = make_corpus(corpus, docs)
    start = time.perf_counter()
    tool = BM25Search(SearchConfig(corpus_path=corpus, top_k=5, snippet_chars=1000))
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    BM25Search(SearchConfig(corpus_path=corpus))  # from the on-disk cache
    load_s = time.perf_counter() - start
    rng = random.Random(1)
    mid = vocab[100:5000]  # neither the commonest words nor ones that never occur
    qs = [" ".join(rng.choices(mid, k=rng.randint(2, 5))) for _ in range(queries)]
    for q in qs[:20]:
        tool(q)
    start = time.perf_counter()
    for q in qs:
        tool(q)
    tool_qps = queries / (time.perf_counter() - start)
    tokens = [[w for w in q.split() if w in tool._vocab] for q in qs]
    start = time.perf_counter()
    for t in tokens:
        tool._retriever.retrieve([t], k=5, show_progress=False)
    bare_qps = queries / (time.perf_counter() - start)
    return {"build_s": build_s, "load_s": load_s, "tool_qps": tool_qps, "bare_qps": bare_qps}


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
    args = parser.parse_args()

    print(
        f"# tools benchmark: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    if not args.skip_python:
        print("| python tool | pool | calls/s |\n|---|---|---|")
        print(f"| bare subprocess (peer, sequential) | 1 | {bench_bare_subprocess(args.calls):.1f} |")
        for mode in args.modes:
            try:
                PythonTool(PythonToolConfig(sandbox=mode))
            except ValueError as exc:  # this mode cannot work here
                print(f"| executor, {mode} | - | unavailable: {exc} |")
                continue
            for workers in args.workers:
                rate = bench_python(args.calls, workers, mode)
                print(f"| executor, sandbox={mode} | {workers} | {rate:.1f} |")
        print()
    if not args.skip_search:
        with tempfile.TemporaryDirectory(prefix="arpo_bench_search_") as workdir:
            r = bench_search(args.docs, args.queries, workdir)
        print(f"| search ({args.docs} docs) | value |\n|---|---|")
        print(f"| index build (tokenise + BM25 + save) | {r['build_s']:.1f} s |")
        print(f"| index load from disk cache | {r['load_s']:.2f} s |")
        print(f"| queries/s through the tool (top 5, snippets read from the corpus) | {r['tool_qps']:.0f} |")
        print(f"| queries/s, bare bm25s retrieve (peer) | {r['bare_qps']:.0f} |")


if __name__ == "__main__":
    main()

"""Search tools: local BM25 over a JSONL corpus (index cached on disk) and the HTTP backend
(retries, backoff, timeouts, cache), the latter against a server on 127.0.0.1 only."""

import json
import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from arpo_fast.rollout.tools import create_tool
from arpo_fast.rollout.tools.http_search import HttpSearch, HttpSearchConfig
from arpo_fast.rollout.tools.search import BM25Search, SearchConfig

CORPUS = os.path.join(os.path.dirname(__file__), "data", "mini_corpus.jsonl")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    shutil.copy(CORPUS, path)
    return str(path)


def test_best_document_first_with_pages_and_cap(corpus):
    tool = BM25Search(SearchConfig(corpus_path=corpus, top_k=2, snippet_chars=30))
    result = tool("Eiffel Tower in Paris")
    assert result.ok and result.info["ids"][0] == "d3"
    assert result.text.startswith("Page 1: Eiffel Tower\nThe Eiffel Tower is a wrought-...")
    assert "Page 2:" in result.text and "Page 3:" not in result.text


def test_untitled_document_and_k_larger_than_corpus(corpus):
    tool = BM25Search(SearchConfig(corpus_path=corpus, top_k=50))
    hits = tool.search("Great Wall fortifications", 50)
    assert hits[0].id == "d8" and hits[0].title == ""
    assert len(tool.search("capital", 50)) == 2  # only documents that match a query word


def test_concurrent_queries_agree_with_sequential(corpus):
    from concurrent.futures import ThreadPoolExecutor

    tool = BM25Search(SearchConfig(corpus_path=corpus))
    queries = ["Paris capital", "river Seine", "Nobel physics", "programming language", "Berlin"] * 8
    expected = [tool(q).text for q in queries]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda q: tool(q).text, queries)) == expected


def test_empty_and_unmatched_queries(corpus):
    tool = BM25Search(SearchConfig(corpus_path=corpus))
    assert tool("   ").status == "bad_input"
    result = tool("zyxwvut qqq")
    assert result.ok and result.text == "No results found for 'zyxwvut qqq'."


def test_index_is_cached_and_rebuilt_when_the_corpus_changes(corpus, monkeypatch):
    BM25Search(SearchConfig(corpus_path=corpus))
    assert os.path.exists(corpus + ".bm25s/arpo_fast_index.json")

    def no_build(self, manifest):
        raise AssertionError("the cached index should have been loaded")

    with monkeypatch.context() as m:
        m.setattr(BM25Search, "_build", no_build)
        assert BM25Search(SearchConfig(corpus_path=corpus))("Seine river").info["ids"][0] in ("d5", "d1")
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "d9", "title": "Kilimanjaro", "text": "Kilimanjaro volcano"}) + "\n")
    tool = BM25Search(SearchConfig(corpus_path=corpus))
    assert tool("Kilimanjaro").info["ids"] == ["d9"]


@pytest.mark.parametrize("index_dir", ["corpus folder", "user folder"])
def test_index_dir_never_deletes_files_it_did_not_write(corpus, index_dir):
    """The corpus's own folder, or a folder of the user's files, is refused and left as it was."""
    folder = os.path.dirname(corpus)
    if index_dir == "user folder":
        folder = os.path.join(folder, "notes")
        os.makedirs(folder)
        with open(os.path.join(folder, "todo.txt"), "w") as f:
            f.write("mine")
    before = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    with pytest.raises(ValueError, match="index_dir .* holds no search index of arpo_fast"):
        BM25Search(SearchConfig(corpus_path=corpus, index_dir=folder))
    after = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    assert after == before


def test_index_dir_new_empty_or_ours(corpus, tmp_path, monkeypatch):
    for folder in (tmp_path / "new" / "index", tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        tool = BM25Search(SearchConfig(corpus_path=corpus, index_dir=str(folder)))
        assert tool("Eiffel Tower").ok and (folder / "arpo_fast_index.json").exists()
    # a stale index of ours is replaced; a file someone added since then stops the replacement
    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "d9", "title": "Kilimanjaro", "text": "Kilimanjaro volcano"}) + "\n")
    tool = BM25Search(SearchConfig(corpus_path=corpus, index_dir=str(folder)))
    assert tool("Kilimanjaro").info["ids"] == ["d9"]
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="holds no search index"):
        BM25Search(SearchConfig(corpus_path=corpus, index_dir=str(folder)))
    assert (folder / "mine.txt").read_text() == "keep"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".arpo_bm25s")]  # no build leftovers


@pytest.mark.parametrize("stale", [False, True])
def test_a_marker_naming_other_files_is_refused_and_deletes_nothing(corpus, tmp_path, stale):
    """A marker is data anybody may have written (an index shipped beside a corpus): names in it
    that this code never writes, outside the folder or not, are refused and never removed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (tmp_path / "victim").write_text("mine too")
    folder = tmp_path / "IDX"
    folder.mkdir()
    marker = {"format": 2, "files": [str(victim), "../victim"], "manifest": {}}
    if stale:  # a real index of ours first, then its marker rewritten
        BM25Search(SearchConfig(corpus_path=corpus, index_dir=str(folder)))
        marker["files"] += sorted(os.listdir(folder))
    (folder / "arpo_fast_index.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError) as info:
        BM25Search(SearchConfig(corpus_path=corpus, index_dir=str(folder)))
    message = str(info.value)
    assert "arpo_fast_index.json lists" in message and "victim" in message and "\n" not in message
    assert victim.read_text() == "mine" and (tmp_path / "victim").read_text() == "mine too"
    assert "arpo_fast_index.json" in os.listdir(folder)


def test_a_marker_that_is_not_json_is_refused(corpus, tmp_path):
    folder = tmp_path / "IDX"
    folder.mkdir()
    (folder / "arpo_fast_index.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="is not an index marker"):
        BM25Search(SearchConfig(corpus_path=corpus, index_dir=str(folder)))
    assert (folder / "arpo_fast_index.json").read_text() == "[" * 100_000


def test_an_index_of_the_earlier_format_is_replaced(corpus):
    folder = corpus + ".bm25s"
    os.makedirs(folder)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"format": 1}, f)
    open(os.path.join(folder, "spans.npy"), "wb").close()
    assert BM25Search(SearchConfig(corpus_path=corpus))("Eiffel").ok
    names = os.listdir(folder)
    assert "arpo_fast_index.json" in names and "manifest.json" not in names


def test_a_failing_search_reads_back_an_error(corpus, monkeypatch):
    tool = BM25Search(SearchConfig(corpus_path=corpus))
    monkeypatch.setattr(tool, "search", lambda q, k: 1 / 0)
    result = tool("Paris")
    assert result.status == "error" and "ZeroDivisionError" in result.text


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not a valid JSON line"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"id": 1, "title": "t"}', "line 2: the document has no string 'text' field"),
        ('{"text": "x", "title": 5}', "line 2: 'title' must be a string"),
    ],
)
def test_bad_corpus_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "ok", "text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        BM25Search(SearchConfig(corpus_path=str(path)))
    assert path.read_text().endswith(line + "\n")  # the corpus is left as it was


def test_empty_corpus_and_config_errors(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        BM25Search(SearchConfig(corpus_path=str(path)))
    with pytest.raises(ValueError, match="corpus_path is required"):
        SearchConfig()
    with pytest.raises(ValueError, match="top_k"):
        SearchConfig(corpus_path="x", top_k=0)


def test_registry_builds_search(corpus):
    tool = create_tool("search", corpus_path=corpus, top_k=1)
    assert tool.name == "search" and tool("Marie Curie Nobel").info["ids"] == ["d7"]


# -- HTTP backend ---------------------------------------------------------------------------


class _Service:
    """A scripted search service on 127.0.0.1: ``plan`` lists, per request, what to do."""

    def __init__(self):
        self.plan, self.requests = [], []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                service.requests.append(body)
                action = service.plan.pop(0) if service.plan else "ok"
                if action == "slow":
                    time.sleep(0.5)
                    action = "ok"
                if isinstance(action, int):
                    self.send_response(action)
                    self.end_headers()
                    return
                payload = (
                    b"not json"
                    if action == "garbage"
                    else json.dumps(
                        {
                            "results": [
                                {"id": "r1", "title": f"About {body['query']}", "text": "x" * 50},
                                {"id": "r2", "title": "Second", "snippet": "second result"},
                            ]
                        }
                    ).encode()
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/search"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def service():
    s = _Service()
    yield s
    s.server.shutdown()
    s.server.server_close()


def _http(service, **kw):
    return HttpSearch(HttpSearchConfig(url=service.url, backoff_s=0.01, timeout_s=0.3, **kw))


def test_http_result_format(service):
    result = _http(service, snippet_chars=10)("weather")
    assert result.ok and result.text == (
        "Page 1: About weather\nxxxxxxxxxx...\n\nPage 2: Second\nsecond res..."
    )
    assert service.requests == [{"query": "weather", "top_k": 5}]


def test_http_retries_server_errors_with_backoff(service):
    service.plan = [500, 503, 429]
    start = time.monotonic()
    tool = HttpSearch(HttpSearchConfig(url=service.url, backoff_s=0.05, retries=3))
    assert tool("q").ok and len(service.requests) == 4
    assert time.monotonic() - start >= 0.05 + 0.1 + 0.2  # 0.05 * (1 + 2 + 4)


def test_http_gives_up_after_retries(service):
    service.plan = [500] * 10
    result = _http(service, retries=2)("q")
    assert result.status == "error" and "no answer after 3 attempts" in result.text
    assert len(service.requests) == 3


def test_http_client_errors_are_not_retried(service):
    service.plan = [404, "garbage"]
    tool = _http(service)
    assert "HTTP 404" in tool("q").text and len(service.requests) == 1
    assert "not JSON" in tool("q2").text and len(service.requests) == 2


def test_http_timeout_is_retried(service):
    service.plan = ["slow"]
    assert _http(service, retries=1)("q").ok and len(service.requests) == 2


def test_http_cache_on_disk(service, tmp_path):
    cache = str(tmp_path / "cache.jsonl")
    first = _http(service, cache_path=cache)
    assert not first("q").info["cached"] and first("q").info["cached"]
    with open(cache, "a") as f:
        f.write("{broken line\n")
    second = _http(service, cache_path=cache)  # a new process would read the same file
    assert second("q").info["cached"] and len(service.requests) == 1
    assert "{broken line" in open(cache).read()  # nothing in the cache file is thrown away


def test_http_config_errors():
    with pytest.raises(ValueError, match="http"):
        HttpSearchConfig(url="ftp://x")
    with pytest.raises(ValueError, match="retries"):
        HttpSearchConfig(url="http://127.0.0.1:1", retries=-1)

"""Tool-call protocol: stop detection across token boundaries, call parsing, limits, result tokens.

Tokenizers are trained here on a few strings (no downloads), with vocabularies small enough that tags
are cut into pieces, large enough that tags become single tokens, and without pre-tokenisation so
that a closing tag merges with the text around it.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from arpo_fast.rollout.protocol import (
    Protocol,
    ProtocolConfig,
    StopDetector,
    TokenBytes,
    format_result,
    parse_tool_call,
)

CORPUS = [
    "<think>I should compute this.</think><python>\nprint(1 + 2)\n</python> <result>\n3\n</result>",
    "<search>capital of France</search> then <answer>The answer is \\boxed{Paris}</answer>",
    "x = 'é中文'</python>\n\n<python>for i in range(3): print(i)</python>\nDone.",
]


def _byte_level(vocab_size: int, split_words: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """Metaspace words plus <0xNN> byte-fallback tokens, like Llama-2's tokenizer."""
    pieces = ["<unk>", "<eos>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = [
        "\u2581<python>",
        "print(1)",
        "</python>",
        "</",
        "python>",
        "\u2581x",
        "<answer>",
        "</answer>",
        "\u2581",
        "<",
        "/",
        ">",
        "p",
        "y",
        "t",
        "h",
        "o",
        "n",
        "a",
        "s",
        "w",
        "e",
        "r",
    ]
    vocab = {p: i for i, p in enumerate(pieces + words)}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "bytes": _byte_level(258),
        "small": _byte_level(300),
        "large": _byte_level(1000),
        "merged": _byte_level(1000, split_words=False),
    }


def _events(tokenizer, text, config=None, tools=None):
    traj = Protocol(tokenizer, config or ProtocolConfig(), available_tools=tools).new_trajectory()
    events = []
    for tid in tokenizer.encode(text, add_special_tokens=False):
        event = traj.feed(tid)
        if event is not None:
            events.append(event)
    return traj, events


@pytest.mark.parametrize("name", ["bytes", "small", "large", "merged"])
def test_tool_call_found_whatever_the_tokenizer_merges(tokenizers, name):
    tok = tokenizers[name]
    text = "<think>hmm</think><python>\nprint(1 + 2)\n</python>"
    _, events = _events(tok, text)
    assert [e.kind for e in events] == ["call"]
    assert events[0].call.name == "python" and events[0].call.ok
    assert events[0].call.body == "\nprint(1 + 2)\n"


def test_tags_really_are_split_and_merged(tokenizers):
    """The fixtures cover what they claim: a tag cut into pieces, and a tag merged with text."""
    pieces = tokenizers["small"].convert_ids_to_tokens(tokenizers["small"].encode("</python>"))
    assert len(pieces) > 1
    merged = tokenizers["merged"]
    ids = merged.encode("x = 'é中文'</python>\n\n", add_special_tokens=False)
    strings = [merged.decode([i]) for i in ids]
    assert any("</python>" in s and s != "</python>" for s in strings), strings


def test_closing_tag_merged_with_following_text(tokenizers):
    tok = tokenizers["merged"]
    ids = tok.encode("<python>x = 'é中文'</python>\n\n", add_special_tokens=False)
    traj = Protocol(tok).new_trajectory()
    n, event = next((n, e) for n, e in enumerate(map(traj.feed, ids), 1) if e is not None)
    assert event.call.body == "x = 'é中文'"
    # what came in the same token as the tag is reported, not lost
    assert event.trailing and tok.decode(ids[:n]).endswith("</python>" + event.trailing)


def test_multibyte_characters_split_across_tokens(tokenizers):
    tok = tokenizers["bytes"]  # every byte is its own token: 中 takes three
    _, events = _events(tok, "<python>print('中文é')</python>")
    assert events[0].call.body == "print('中文é')" and events[0].call.ok


def test_bytes_that_are_not_utf8_are_named(tokenizers):
    tok = tokenizers["bytes"]
    traj = Protocol(tok).new_trajectory()
    token_bytes = TokenBytes(tok)
    byte_id = {token_bytes(i): i for i in range(len(tok))}
    ids = tok.encode("<python>x", add_special_tokens=False) + [byte_id[b"\xff"], byte_id[b"\xfe"]]
    ids += tok.encode("</python>", add_special_tokens=False)
    events = [e for e in map(traj.feed, ids) if e is not None]
    assert events[0].kind == "call" and "not valid UTF-8" in events[0].call.error


def test_sentencepiece_style_tokenizer():
    tok = _sentencepiece_like()
    assert TokenBytes(tok).mode == "sentencepiece"
    _, events = _events(tok, "<python>print(1)</python>")
    assert events[0].call.body == "print(1)"
    # 中 is not in the vocabulary: it arrives as three <0xNN> byte tokens
    _, events = _events(tok, "<python>中</python>")
    assert events[0].call.body == "中"


def test_answer_end_and_eos(tokenizers):
    tok = tokenizers["small"]
    _, events = _events(tok, "<answer>\\boxed{Paris}</answer>", ProtocolConfig(stop_at_answer=True))
    assert [e.kind for e in events] == ["answer"]
    traj = Protocol(tok).new_trajectory()
    assert traj.feed(tok.eos_token_id).kind == "eos"


def test_by_default_the_answer_does_not_stop_generation(tokenizers):
    """As in the reference, only closing tool tags and EOS end a segment: text after </answer> is
    generated (and scored), and a call written after the answer is still a call."""
    tok = tokenizers["small"]
    _, events = _events(tok, "<answer>\\boxed{Paris}</answer> more <python>1</python>")
    assert [e.kind for e in events] == ["call"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("<python>a = 1 <search>q</search>", "never closed"),
        ("<python>  \n </python>", "empty"),
        ("print(1)</python>", "without an opening"),
    ],
)
def test_malformed_calls_say_what_is_wrong(tokenizers, text, message):
    _, events = _events(tokenizers["small"], text)
    assert events[0].kind == "call" and not events[0].call.ok
    assert message in events[0].call.error


@pytest.mark.parametrize(
    "body", ["s = '<search>'\nprint(s)", "a = '<result>x'", "print('<answer> and <search>q')"]
)
def test_tags_in_code_that_the_protocol_does_not_act_on_are_text(tokenizers, body):
    _, events = _events(tokenizers["small"], f"<python>{body}</python>")
    assert events[0].kind == "call" and events[0].call.ok and events[0].call.body == body


@pytest.mark.parametrize("body", ["print('</result>')", "x = 1\n</result> <answer>\\boxed{1}", "</result>"])
def test_a_closing_result_tag_in_a_body_is_refused(tokenizers, body):
    """Only a tool's answer ends with </result>: a call whose body holds one is not run."""
    _, events = _events(tokenizers["small"], f"<python>{body}</python>")
    call = events[0].call
    assert events[0].kind == "call" and not call.ok and "</result>" in call.error
    custom = ProtocolConfig(tool_names=("calc",), result_tag="output")
    assert "</output>" in parse_tool_call("<calc>1 </output></calc>", "calc", 17, custom).error


def test_a_stop_tag_inside_a_body_is_nested():
    """Only reachable by callers that hand the parser a whole text: the detector stops earlier."""
    segment = "<python>x = 1 </search> y</python>"
    call = parse_tool_call(segment, "python", segment.rfind("</python>"), ProtocolConfig())
    assert "</search>" in call.error and "nested" in call.error


def test_unknown_tool(tokenizers):
    _, events = _events(tokenizers["small"], "<python>print(1)</python>", tools={"search"})
    assert "Unknown tool 'python'" in events[0].call.error


def test_parser_never_raises_on_garbage():
    config = ProtocolConfig()
    for text in ["", "</python>", "<python></python>", "\udcff</python>", "<<python>>x</python>"]:
        at = text.rfind("</python>")
        call = parse_tool_call(text, "python", max(at, 0), config)
        assert call.name == "python"


def test_call_limit_ends_the_trajectory(tokenizers):
    tok = tokenizers["large"]
    protocol = Protocol(tok, ProtocolConfig(max_calls=2))
    traj = protocol.new_trajectory()
    kinds = []
    for i in range(3):
        for tid in tok.encode(f"<search>q{i}</search>", add_special_tokens=False):
            event = traj.feed(tid)
            if event is not None:
                kinds.append(event.kind)
                if event.kind == "call":
                    traj.result_ids("out")
    assert kinds == ["call", "call", "limit"]
    assert traj.calls == 2


def test_result_tokens_and_new_segment(tokenizers):
    tok = tokenizers["large"]
    traj, events = _events(tok, "<python>print(1)</python>")
    ids = traj.result_ids("1")
    assert tok.decode(ids) == " <result>\n1\n</result>"
    assert format_result("x\udcff") == " <result>\nx\ufffd\n</result>"
    # the next call's body comes from the new segment only
    events = [
        e for e in map(traj.feed, tok.encode("<python>print(2)</python>", add_special_tokens=False)) if e
    ]
    assert events[0].call.body == "print(2)"


def test_fork_is_independent(tokenizers):
    tok = tokenizers["bytes"]
    traj = Protocol(tok).new_trajectory()
    for tid in tok.encode("<python>print('中", add_special_tokens=False)[:-1]:  # stop mid-character
        traj.feed(tid)
    twin = traj.fork()
    rest = tok.encode("中')</python>", add_special_tokens=False)
    last = tok.encode("<python>print('中", add_special_tokens=False)[-1:]
    for t in (traj, twin):
        events = [e for e in map(t.feed, last + rest[3:]) if e]
        assert events[0].call.body == "print('中')"


def test_config_rejects_bad_tags():
    with pytest.raises(ValueError, match="distinct"):
        ProtocolConfig(tool_names=("search", "result"))
    with pytest.raises(ValueError, match="tag name"):
        ProtocolConfig(tool_names=("py thon",))
    with pytest.raises(ValueError, match="max_calls"):
        ProtocolConfig(max_calls=-1)


def test_custom_tags(tokenizers):
    config = ProtocolConfig(tool_names=("calc",), result_tag="output")
    traj, events = _events(tokenizers["bytes"], "<calc>2+2</calc>", config)
    assert events[0].call.name == "calc" and events[0].call.body == "2+2"
    assert tokenizers["bytes"].decode(traj.result_ids("4")) == " <output>\n4\n</output>"


def test_detector_work_per_token_is_constant(tokenizers):
    """A long generation costs about as much per token as a short one (no re-decoding)."""
    import time

    tok = tokenizers["small"]
    ids = tok.encode("print(i) and more words " * 40, add_special_tokens=False)

    def cost(n):
        det = StopDetector(tok)
        start = time.perf_counter()
        for _ in range(n):
            for tid in ids:
                det.feed(tid)
        return (time.perf_counter() - start) / (n * len(ids))

    short, long = cost(1), cost(50)
    assert long < short * 5


PIECES = st.sampled_from(
    [
        "<python>",
        "</python>",
        "<search>",
        "</search>",
        "</answer>",
        "</",
        "python",
        ">",
        "x",
        " ",
        "é",
        "中",
        "\n",
        "</pyth",
        "on>",
    ]
)


@settings(max_examples=60, deadline=None)
@given(st.lists(PIECES, max_size=30))
def test_incremental_detection_matches_whole_text_search(tokenizers, pieces):
    """The first stop found token by token is the first stop string in the decoded text."""
    text = "".join(pieces)
    stops = ["</python>", "</search>", "</answer>"]
    expected = min((text.find(s) + len(s) for s in stops if s in text), default=None)
    for name in ("bytes", "small", "merged"):
        tok = tokenizers[name]
        ids = tok.encode(text, add_special_tokens=False)
        det = StopDetector(tok, ProtocolConfig(stop_at_answer=True))
        found = None
        for n, tid in enumerate(ids, 1):
            if det.feed(tid) is not None:
                found = len(tok.decode(ids[:n]))
                break
        if expected is None:
            assert found is None
        else:  # the stop is inside the token that completed it
            assert found is not None and found >= expected
            assert len(tok.decode(ids[: n - 1])) < expected

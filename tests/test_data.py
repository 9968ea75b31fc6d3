"""Data files: JSONL and the reference's Parquet rows, their repairs, and a one-line error naming
the file (and row) for each kind of bad input; a tokenizer of one's own beside a model's config."""

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arpo_fast.train.data import load_examples, normalize_row, read_rows
from arpo_fast.train.demo import demo_tokenizer
from arpo_fast.train.loop import main

# the reference's system prompt, with "\boxed" stored as backspace + "oxed" as in its RL files
SYSTEM = "Reason step by step and put the final answer within \x08oxed{}."


def _reference_rows():
    return [
        {
            "data_source": "math",
            "ability": "math",
            "extra_info": {"index": 0, "split": "train"},
            "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 6 * 7?"}],
            "reward_model": {"ground_truth": "42", "style": "rule"},
        },
        {
            "data_source": "hotpotqa",
            "ability": "qa",
            "extra_info": {"index": 1, "split": "train"},
            "prompt": [
                {"role": "system", "content": "No box here."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "reward_model": {"ground_truth": "Paris", "style": "rule"},
        },
    ]


def test_reference_parquet_rows_load_with_boxed_repaired(tmp_path, caplog):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_reference_rows()), path)
    with caplog.at_level(logging.INFO, logger="arpo_fast.train.data"):
        rows = read_rows(str(path))
    assert rows[0]["prompt"][0]["content"] == "Reason step by step and put the final answer within \\boxed{}."
    assert rows[1]["prompt"][0]["content"] == "No box here."
    assert [r["ground_truth"] for r in rows] == ["42", "Paris"]
    assert [r["data_source"] for r in rows] == ["math", "hotpotqa"]
    repairs = [r.getMessage() for r in caplog.records if "repaired" in r.getMessage()]
    assert repairs == [f"{path}: repaired \\boxed (stored as a backspace and 'oxed') in 1 of 2 rows"]
    tok = demo_tokenizer()
    examples = load_examples(str(path), tok)
    assert [e.ground_truth for e in examples] == ["42", "Paris"]
    assert examples[0].prompt_ids == tok.encode(
        "Reason step by step and put the final answer within \\boxed{}.\nWhat is 6 * 7?\n"
    )


def test_jsonl_with_the_reference_shape_loads_too(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _reference_rows()))
    rows = read_rows(str(path))
    assert rows[0]["prompt"][0]["content"].endswith("\\boxed{}.") and rows[1]["ground_truth"] == "Paris"


def test_numpy_ground_truths_become_lists():
    """pandas hands the reference's list columns over as numpy arrays."""
    row = normalize_row(
        {
            "prompt": np.array([{"role": "user", "content": "Q"}], dtype=object),
            "reward_model": {"ground_truth": np.array(["Paris", "paris, france"])},
            "data_source": None,
        }
    )
    assert row["ground_truth"] == ["Paris", "paris, france"] and type(row["ground_truth"]) is list
    assert row["prompt"] == [{"role": "user", "content": "Q"}] and "data_source" not in row


def test_parquet_list_ground_truth(tmp_path):
    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q?", "ground_truth": ["a", "b"]}]), path)
    assert read_rows(str(path))[0]["ground_truth"] == ["a", "b"]


def _bad_inputs(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    bad_row = tmp_path / "bad.jsonl"
    bad_row.write_text('{"prompt": "hi", "ground_truth": "1"}\n{"prompt": "hi", "ground_truth": 7}\n')
    no_column = tmp_path / "no_truth.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q", "answer": "1"}]), no_column)
    bad_parquet_row = tmp_path / "bad_row.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "Q", "ground_truth": "1"}, {"prompt": "", "ground_truth": "2"}]),
        bad_parquet_row,
    )
    corrupt = tmp_path / "cut.parquet"
    corrupt.write_bytes(b"PAR1" + b"\0" * 64)
    return [
        (tmp_path / "missing.jsonl", "missing.jsonl: no such file"),
        (folder, "folder: is a directory"),
        (binary, "weights.bin: neither a JSONL file .* nor a Parquet file"),
        (bad_row, "bad.jsonl:2: 'ground_truth'"),
        (no_column, "no_truth.parquet: no 'ground_truth' column .*its columns: prompt, answer"),
        (bad_parquet_row, "bad_row.parquet: row 2: 'prompt' must be"),
        (corrupt, "cut.parquet: cannot read it as Parquet"),
    ]


def test_bad_files_get_a_one_line_error_naming_them(tmp_path, capsys):
    for path, message in _bad_inputs(tmp_path):
        with pytest.raises(ValueError, match=message):
            read_rows(str(path))
        for flag in ("--data", "--eval-data"):  # the same message from the command line, no traceback
            out = str(tmp_path / f"run-{path.name}{flag}")
            assert main([flag, str(path), "--demo-warm-start", "0", "--out", out]) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith("arpo_fast.train: error: ") and "\n" not in err, err
            assert path.name in err and flag in err and "Traceback" not in err
            assert not Path(out).exists()  # read before the run writes (or warm-starts) anything


def test_a_tokenizer_of_ones_own_beside_a_qwen2_config_needs_its_own_folder(tmp_path):
    """transformers 5 loads the model type's tokenizer (Qwen2's splits digits its own way) from a
    folder with a Qwen2 config.json; --tokenizer points at the one that was saved."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    from arpo_fast.train.config import TrainConfig
    from arpo_fast.train.demo import demo_model
    from arpo_fast.train.loop import setup

    tok = demo_tokenizer()  # a tokenizer that splits text its own way (a character at a time)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("."), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    model_dir, tok_dir = tmp_path / "model", tmp_path / "tokenizer"
    demo_model(tok, layers=1, hidden=32).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    tok.save_pretrained(tok_dir)
    text = "<python>print(123 * 456)</python>"
    assert AutoTokenizer.from_pretrained(model_dir).encode(text) != tok.encode(text)  # the trap
    cfg = TrainConfig.from_flat(
        model=str(model_dir), tokenizer=str(tok_dir), out=str(tmp_path / "run"), tools="", eval_data="none"
    )
    run = setup(cfg)
    assert run.tokenizer.encode(text) == tok.encode(text)
    assert cfg.lr == 1e-6  # a model of one's own gets the reference's learning rate, not the demo's
    with pytest.raises(ValueError, match="--tokenizer '/nonexistent': not a local tokenizer directory"):
        setup(TrainConfig.from_flat(model=str(model_dir), tokenizer="/nonexistent", out=str(tmp_path / "r2")))

"""The package as a new user runs it: commands started from the repository root, where the working
directory comes first on ``sys.path``, must import the installed dependencies, not our folders.

transformers imports Hugging Face's top-level ``kernels`` package as soon as it builds a model; a
``kernels/__init__.py`` of ours in the repository root once shadowed it and broke every command run
from there. These tests start fresh interpreters from the root, as the README's commands do.
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_from_root(*args, timeout=300):
    """``python args...`` started from the repository root; the completed process."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_transformers_builds_a_qwen2_model_from_the_repository_root():
    code = (
        "import torch, transformers\n"
        "cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,\n"
        "    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)\n"
        "model = transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "print(model(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    proc = _run_from_root("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([1, 3, 64])" in proc.stdout


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_kernels_from_the_repository_root_is_never_our_folder():
    """With Hugging Face's ``kernels`` installed, ``import kernels`` is theirs; without it, our
    folder is at most an empty namespace (it exports nothing)."""
    code = (
        "import json, kernels\n"
        "print(json.dumps({'file': getattr(kernels, '__file__', None),\n"
        "                  'path': [str(p) for p in kernels.__path__],\n"
        "                  'sample': hasattr(kernels, 'sample')}))\n"
    )
    proc = _run_from_root("-c", code)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = str(ROOT / "kernels")
    assert not found["sample"]
    if _installed("kernels"):
        assert ours not in found["path"], found
        assert found["file"] and not found["file"].startswith(ours), found
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_the_kernels_api_is_importable_from_anywhere(tmp_path):
    code = "import arpo_fast.kernels as k; print(k.sample.__module__, k.logprob_entropy.__module__)"
    for cwd in (ROOT, tmp_path):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["arpo_fast.kernels.sampling", "arpo_fast.kernels.logprob_entropy"]


def _our_top_level_names() -> dict[str, Path]:
    """Module names a command of ours can put first on ``sys.path``: the repository root (any
    ``python -m`` from there), and ``tests/`` and ``benchmarks/`` (pytest and the benchmark scripts
    run from there). A folder counts when it is a regular package; a file when it is a module."""
    names = {}
    for folder in (ROOT, ROOT / "tests", ROOT / "benchmarks"):
        for entry in folder.iterdir():
            if entry.name.startswith(".") or entry.name == "arpo_fast":
                continue
            if entry.is_dir() and (entry / "__init__.py").exists():
                names[entry.name] = entry
            elif entry.suffix == ".py":
                names[entry.stem] = entry
    return names


def test_no_module_of_ours_shadows_an_installed_distribution():
    """Every top-level name an installed distribution provides (transformers' dependencies
    included) must not also be a module or regular package in a folder we put on ``sys.path``."""
    provided = importlib.metadata.packages_distributions()
    clashes = {
        name: (str(path), provided[name]) for name, path in _our_top_level_names().items() if name in provided
    }
    assert not clashes, f"these would shadow installed packages: {clashes}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_saved_checkpoint_trains_one_step_from_the_repository_root(tmp_path, arch):
    """A model saved by ``save_pretrained`` trains through ``--model`` with the command a user types
    in the repository root (transformers builds the model there, so this is where shadowing bites)."""
    from arpo_fast.engine.random_model import random_causal_lm
    from arpo_fast.train.demo import demo_tokenizer

    tok = demo_tokenizer()
    model = random_causal_lm(
        arch,
        vocab=len(tok),
        hidden=32,
        layers=1,
        intermediate=64,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model_dir, tok_dir = tmp_path / "model", tmp_path / "tokenizer"
    model.save_pretrained(model_dir)
    tok.save_pretrained(tok_dir)
    data = tmp_path / "train.jsonl"
    rows = [
        {"prompt": f"What is {a} + {a}?", "ground_truth": str(2 * a), "data_source": "toy"} for a in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = _run_from_root(
        "-m",
        "arpo_fast.train",
        "--model",
        str(model_dir),
        "--tokenizer",
        str(tok_dir),
        "--data",
        str(data),
        "--tools",
        "",
        "--eval-data",
        "none",
        "--steps",
        "1",
        "--prompts-per-step",
        "2",
        "--rollouts",
        "4",
        "--initial",
        "2",
        "--max-response-tokens",
        "8",
        "--device",
        "cpu",
        "--out",
        str(out),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("step") == 1 for row in rows), rows

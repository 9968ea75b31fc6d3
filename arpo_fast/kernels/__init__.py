"""Triton kernels of arpo_fast, each beside its pure-PyTorch reference.

A public function runs its Triton kernel on CUDA tensors and its PyTorch reference on CPU tensors,
unless ``TRITON_INTERPRET=1`` asks for the kernel on the CPU (that is how the tests exercise the
kernels without a GPU).

Where the modules live: the op files are kept in the repository's top-level ``kernels/`` folder,
which has no ``__init__.py`` on purpose. Hugging Face's ``kernels`` distribution (a transformers
dependency) is a top-level package of that name, and a regular package in the working directory
would shadow it for every ``python -m`` started from the repository root; a folder without
``__init__.py`` is only a namespace candidate, which any installed package outranks. This file is
the package's one entry point: a wheel carries the op files beside it (``setup.py`` copies them),
and a source checkout (an editable install) finds them through ``__path__`` below.
"""

from pathlib import Path as _Path


def _source_folder() -> "_Path | None":
    """The checkout's ``kernels/`` folder when the op files are not installed beside this file."""
    here = _Path(__file__).resolve().parent
    if (here / "sampling.py").is_file():
        return None
    root = here.parents[1]
    folder = root / "kernels"
    # The checkout is recognised by its own files, so a site-packages install never reaches into
    # a neighbouring ``kernels`` package that is not ours.
    if (root / "setup.py").is_file() and (folder / "_dispatch.py").is_file():
        return folder
    raise ImportError(
        f"arpo_fast.kernels: the kernel modules are missing beside {here} and no source checkout "
        "holds them; reinstall with `pip install -e .` from the repository root"
    )


_folder = _source_folder()
if _folder is not None:
    __path__.append(str(_folder))  # noqa: F821 - a package's __path__ is set by the import system

from .kv_write import rotary_kv_write, rotary_kv_write_ref  # noqa: E402 - after __path__ holds the kernels' folder
from .logprob_entropy import logprob_entropy, logprob_entropy_ref  # noqa: E402 - after __path__ holds the kernels' folder
from .paged_attention import (  # noqa: E402 - after __path__ holds the kernels' folder
    paged_attention_decode,
    paged_attention_decode_ref,
    paged_attention_extend,
    paged_attention_extend_ref,
)
from .sampling import SampleOutput, sample, sample_ref  # noqa: E402 - after __path__ holds the kernels' folder

__all__ = [
    "SampleOutput",
    "logprob_entropy",
    "logprob_entropy_ref",
    "paged_attention_decode",
    "paged_attention_decode_ref",
    "paged_attention_extend",
    "paged_attention_extend_ref",
    "rotary_kv_write",
    "rotary_kv_write_ref",
    "sample",
    "sample_ref",
]

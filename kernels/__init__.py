"""Triton kernels of arpo_fast, each beside its pure-PyTorch reference.

Installed as ``arpo_fast.kernels``. A public function runs its Triton kernel on CUDA tensors and its
PyTorch reference on CPU tensors, unless ``TRITON_INTERPRET=1`` asks for the kernel on the CPU
(that is how the tests exercise the kernels without a GPU).
"""

from .logprob_entropy import logprob_entropy, logprob_entropy_ref  # noqa: F401

from .sampling import SampleOutput, sample, sample_ref  # noqa: E402,F401

from .paged_attention import (  # noqa: E402,F401
    paged_attention_decode,
    paged_attention_decode_ref,
    paged_attention_extend,
    paged_attention_extend_ref,
)

from .kv_write import rotary_kv_write, rotary_kv_write_ref  # noqa: E402,F401

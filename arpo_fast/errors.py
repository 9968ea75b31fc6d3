"""Exceptions shared by the native forker, its Python reference and the engine."""


class PoolExhaustedError(RuntimeError):
    """The KV pool has too few free blocks for a request; nothing was changed."""


class UnknownSequenceError(LookupError):
    """A sequence id that was never created, or has been freed."""

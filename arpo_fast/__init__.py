"""arpo_fast: a fast engine for training tool-using LLM agents with ARPO."""

from arpo_fast._version import __version__

__all__ = ["__version__", "native"]


def native():
    """Return the native module ``arpo_fast._C``, with rebuild instructions if it is missing."""
    try:
        from arpo_fast import _C
    except ImportError as exc:  # the message is the point: say how to get it back
        raise ImportError(
            "arpo_fast's native module arpo_fast._C could not be imported "
            f"({exc}). It is built by CMake when the package is installed; rebuild it from the "
            "repository root with `pip install -e .` (or `pip install --no-build-isolation -e .` "
            "when the build tools are already installed)."
        ) from exc
    return _C

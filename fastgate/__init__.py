"""fastgate: a key-based API gateway (uvloop + httptools workers, Cython shared-memory core)."""

from ._version import __version__

__all__ = ["__version__"]

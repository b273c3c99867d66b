"""fastgate: a key-based API gateway (uvloop workers on a Cython HTTP data plane and shared-memory core)."""

from ._version import __version__

__all__ = ["__version__"]

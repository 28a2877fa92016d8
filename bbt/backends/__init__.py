"""How a query reaches a model: the Backend contract and its two implementations.

    LocalBackend   the model runs in this process (needs the `server` extra: torch)
    HTTPBackend    the model runs on a bbt server, reached over HTTP (no torch)
"""

from bbt.backends.base import Backend
from bbt.backends.http import HTTPBackend
from bbt.backends.local import LocalBackend

__all__ = sorted(["Backend", "HTTPBackend", "LocalBackend"])

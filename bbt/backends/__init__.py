"""How a query reaches a model: the Backend contract and its two implementations.

    LocalBackend   the model runs in this process (needs the `server` extra: torch)
    HTTPBackend    the model runs on a bbt server, reached over HTTP (no torch)
    VLLMBackend    the model runs on a vLLM server; inputs become prompt embeddings here (needs torch)

`open_endpoint(url)` picks HTTPBackend or VLLMBackend by what the server answers.
"""

from bbt.backends.base import Backend
from bbt.backends.endpoints import open_endpoint
from bbt.backends.http import HTTPBackend
from bbt.backends.local import LocalBackend
from bbt.backends.vllm import VLLMBackend

__all__ = sorted(["Backend", "HTTPBackend", "LocalBackend", "VLLMBackend", "open_endpoint"])

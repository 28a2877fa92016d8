"""How a query reaches a model: the Backend contract and its two implementations.

    LocalBackend   the model runs in this process (needs the `server` extra: torch)
    HTTPBackend    the model runs on a bbt server, reached over HTTP (no torch)
    VLLMBackend    the model runs on a vLLM server; inputs become prompt embeddings here (needs torch)

`open_backend()` opens any of them: without a URL the model in this process, else `open_endpoint(url)`,
which picks HTTPBackend or VLLMBackend by what the server answers.
"""

from bbt.backends.base import Backend
from bbt.backends.endpoints import open_backend, open_endpoint
from bbt.backends.http import HTTPBackend
from bbt.backends.local import LocalBackend
from bbt.backends.vllm import VLLMBackend

__all__ = sorted(["Backend", "HTTPBackend", "LocalBackend", "VLLMBackend", "open_backend", "open_endpoint"])

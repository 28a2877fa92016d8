"""The exceptions bbt raises. Third-party errors are turned into these at the boundary.

    BBTError
    ├── ConfigError          a bad option, task or file given by the user
    │   └── DataError        a data file that cannot be read or has bad rows
    └── BackendError         the model could not answer
        ├── ModelNotFound    unknown model name or missing model files
        ├── RequestRejected  the server refused the request (4xx); .status, .detail
        │   ├── AuthError    401/403: missing or wrong API key
        │   └── QuotaExhausted  429 that will not clear within the wait (a spent per-key quota)
        └── ServerUnavailable  connection failures, timeouts or 5xx after all retries
"""

from __future__ import annotations


class BBTError(Exception):
    """Base of every bbt error."""


class ConfigError(BBTError, ValueError):
    """A bad option, task spec or file; the message names the value and the fix."""


class DataError(ConfigError):
    """A data file that cannot be read, or a row in it that is malformed."""


class BackendError(BBTError):
    """The model side could not answer."""


class ModelNotFound(BackendError, ConfigError):
    """An unknown model name, or model files that are not there."""


class RequestRejected(BackendError):
    """The server answered 4xx: the request itself is wrong and retrying will not help."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server refused the request ({status}): {detail}")
        self.status = status
        self.detail = detail


class AuthError(RequestRejected):
    """401/403: the API key is missing, wrong or not allowed this."""


class QuotaExhausted(RequestRejected):
    """429 for longer than the client may wait: the key's quota is spent until the server's window resets."""


class ServerUnavailable(BackendError):
    """The server could not be reached or kept failing (5xx, 429, timeouts) through every retry."""

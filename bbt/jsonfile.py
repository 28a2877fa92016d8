"""JSON as bbt writes it to disk: strict (RFC 8259), so that any parser reads it.

Python's `json` writes a float that is not finite as `Infinity` or `NaN`, which strict parsers
(JavaScript's JSON.parse, jq, Go, Rust's serde_json) refuse. A run can hold such values: the best
train loss is infinite until a generation has been scored, a loss of a degenerate split is NaN.
Here they are written as `null`, which every reader of a metric already handles as "not measured".
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def strict(value):
    """`value` with every float that is not finite (in dicts, lists and tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """`json.dumps` of `strict(value)`; anything else not finite is an error, never written."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


def write(path: str | Path, value, **kwargs) -> None:
    """Write `value` to `path` as strict JSON (`dumps`)."""
    Path(path).write_text(dumps(value, **kwargs))

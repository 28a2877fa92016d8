"""Fifty clients at once against one `bbt serve` process: every request answered, every answer right.

Routes run in a threadpool while forward passes take turns on one lock; under that contention no
request may fail or get another request's answer. Half the clients send the Idempotency-Key the
bbt client sends (the sha256 of the body), so identical requests in flight at the same time also
exercise the wait-then-replay path.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import pytest

from serverproc import running_server
from test_server_security import KEY, auth_header, body

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS, BODIES = 50, 3, 5


def test_fifty_concurrent_clients_get_the_single_client_answers(tiny_encoder):
    bodies = [json.dumps(body(k=1 + i % 3, seed=i)).encode() for i in range(BODIES)]
    with running_server("--model", f"tiny={tiny_encoder}", env={"BBT_SERVER_API_KEYS": KEY, "BBT_TEST_FAULTS": "1"}) as server:
        headers = {**auth_header(KEY), "Content-Type": "application/json"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
            expected = [c.post("/v1/evaluate", content=b).content for b in bodies]  # one client, one at a time
        start = threading.Barrier(CLIENTS)
        results: list[tuple[int, int, bytes]] = []
        errors: list[BaseException] = []

        def client(i: int) -> None:
            try:
                with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
                    start.wait()
                    for j in range(REQUESTS):
                        n = (i + j) % BODIES
                        extra = {"Idempotency-Key": hashlib.sha256(bodies[n]).hexdigest()} if i % 2 else {}
                        resp = c.post("/v1/evaluate", content=bodies[n], headers=extra)
                        results.append((n, resp.status_code, resp.content))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - t0
        counts = httpx.get(server.url + "/v1/_faults", headers=auth_header(KEY)).json()
    assert not errors, errors[:3]
    assert len(results) == CLIENTS * REQUESTS
    assert [r for r in results if r[1] != 200] == []
    assert all(content == expected[n] for n, _, content in results), "an answer differs from the single-client one"
    # every request was scored or replayed; the keyed ones were scored at most once per body
    total = BODIES + CLIENTS * REQUESTS
    assert counts["served"] + counts["replayed"] == total
    assert counts["served"] <= total - CLIENTS * REQUESTS // 2 + BODIES
    assert elapsed < 60, f"{CLIENTS * REQUESTS} requests took {elapsed:.1f} s"

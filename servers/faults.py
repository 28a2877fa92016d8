"""A test-only fault switch: make the next evaluate requests fail, so clients' retries can be tested.

Mounted only when the environment variable ``BBT_TEST_FAULTS=1`` is set as the server starts:

    POST /v1/_faults  {"fail_next": 2, "status": 503, "retry_after": 0.5, "delay": 0}
    POST /v1/_faults  {"fail_next": 1, "delay_after": 3}
    GET  /v1/_faults  the counters below, and what is still armed

Each of the next ``fail_next`` evaluate requests first sleeps ``delay`` seconds (longer than the
client's timeout: the client sees a timeout) and then answers ``status`` (with a Retry-After
header when ``retry_after`` is given), *before* any model work is done or counted; ``crash``
raises an unexpected exception instead, to exercise the 500 path.

With ``delay_after`` the armed requests are *served* instead (scored, charged to the quota, their
answer stored for idempotent replay) and then sleep ``delay_after`` seconds before answering: a
client with a shorter timeout gives up although the work was done, the case that idempotency
keys exist for. The counters let a test check that retried requests were served exactly once.
"""

from __future__ import annotations

import threading
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

ENV_VAR = "BBT_TEST_FAULTS"


class FaultPlan(BaseModel):
    """What the next `fail_next` evaluate requests do instead of being served."""

    model_config = ConfigDict(extra="forbid")

    fail_next: int = Field(ge=0, le=1000, description="how many evaluate requests fail (0: disarm)")
    status: Literal[429, 500, 502, 503, 504] = Field(default=503, description="HTTP status they get")
    retry_after: float | None = Field(default=None, ge=0, le=60, description="Retry-After header, seconds")
    delay: float = Field(default=0.0, ge=0, le=60, description="seconds to sleep before answering")
    crash: bool = Field(default=False, description="raise an unexpected exception (a 500) instead")
    delay_after: float = Field(default=0.0, ge=0, le=60, description="serve the request, then sleep this many "
                               "seconds before answering (status, retry_after, delay and crash are then unused)")


class FaultCounters(BaseModel):
    """Evaluate requests seen by the server since it started."""

    received: int = Field(description="evaluate requests that reached the route (valid bodies)")
    injected: int = Field(description="of those, failed on purpose by this switch")
    served: int = Field(description="answered 200 with model work done")
    replayed: int = Field(description="answered 200 from an earlier answer to the same Idempotency-Key (no work)")
    queries_served: int = Field(description="candidates scored in the served requests")
    armed: int = Field(description="failures still to come")


class InjectedFault(Exception):
    """Raised by the switch; the app's handler turns it into `status` with an ErrorBody."""

    def __init__(self, status: int, retry_after: float | None):
        super().__init__(f"injected fault {status}")
        self.status = status
        self.retry_after = retry_after


class FaultSwitch:
    """Armed failures and counters; thread-safe, since evaluate runs in a threadpool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plan = FaultPlan(fail_next=0)
        self._received = self._injected = self._served = self._queries = self._replayed = 0

    def arm(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan

    def before_evaluate(self) -> float:
        """Called first thing in an evaluate request: may sleep, then raise instead of serving it.

        Returns the seconds to sleep after serving it (`delay_after`; 0 for a normal request).
        """
        with self._lock:
            self._received += 1
            plan = self._plan
            if plan.fail_next <= 0:
                return 0.0
            self._plan = plan.model_copy(update={"fail_next": plan.fail_next - 1})
            self._injected += 1
        if plan.delay_after:
            return plan.delay_after
        if plan.delay:
            time.sleep(plan.delay)  # a threadpool thread; other requests are served meanwhile
        if plan.crash:
            raise RuntimeError("injected crash (test fault switch)")
        raise InjectedFault(plan.status, plan.retry_after)

    def served(self, queries: int) -> None:
        with self._lock:
            self._served += 1
            self._queries += queries

    def replayed(self) -> None:
        with self._lock:
            self._replayed += 1

    def counters(self) -> FaultCounters:
        with self._lock:
            return FaultCounters(received=self._received, injected=self._injected, served=self._served,
                                 replayed=self._replayed, queries_served=self._queries, armed=self._plan.fail_next)


router = APIRouter(prefix="/v1/_faults", tags=["test faults"])


@router.post("", response_model=FaultCounters, summary="Arm failures of the next evaluate requests")
def arm_faults(plan: FaultPlan, request: Request) -> FaultCounters:
    switch: FaultSwitch = request.app.state.faults
    switch.arm(plan)
    return switch.counters()


@router.get("", response_model=FaultCounters, summary="Counters of evaluate requests")
def fault_counters(request: Request) -> FaultCounters:
    return request.app.state.faults.counters()

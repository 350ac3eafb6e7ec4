"""Who runs next: the waiting queue, its places, cancellation and admission (no model, no tensors).

A request holds a queue place from `reserve` (before it is even built, so a full queue is
refused at once) until it joins the batch, is cancelled, or fails. Places are shared fairly:
once the queue is full, a tenant (client key) still gets a place while it holds fewer than its
share, `max_queue` divided by the tenants holding places, so a flood from one key fills only
its own share. `admit` hands the engine's loop the next waiting requests, tenants in turn
(fair_queue.py), up to the batch's free rows and each tenant's share of the rows (`admit` says
how that share is set); a request cancelled while it waited ends there with finish reason
"cancelled".
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

from server.engine.errors import EngineNotReadyError, QueueFullError, ShuttingDownError
from server.engine.fair_queue import FairQueue
from server.engine.sequence import DEFAULT_TENANT, DoneEvent, GenerationRequest

DEMAND_MEMORY_S = 0.5  # how long a tenant's peak demand (rows running + waiting) is remembered
# Beside other keys, a flooding key's requests start in prefill passes others' requests start
# (a prefill pass stalls every running row: alone, each flood request would cost one), and in a
# pass of its own at most once in this long.
FLOOD_RIDE_S = 2.0
# Beside other keys, a flooding key starts at most `flood_rows` requests for each request the
# most active other key starts (and one more): starts counted with this time constant.
START_MEMORY_S = 10.0


class Scheduler:
    def __init__(
        self,
        *,
        max_queue: int,
        retry_after: int,
        policy: str = "fair",
        clock=time.monotonic,
        flooding=None,
        flood_rows: float = 0.125,
    ):
        self.max_queue, self.retry_after, self.clock = max_queue, retry_after, clock
        # flooding(tenant): whether it retries refused requests at once; such a tenant runs
        # `flood_rows` of the rows the others ask for
        self.flooding, self.flood_rows = flooding or (lambda tenant: False), flood_rows
        self.peaks: dict[str, tuple[float, int]] = {}  # tenant -> (when, its highest demand since)
        self.own_pass: dict[str, float] = {}  # flooding tenant -> when a pass last started for it alone
        self.starts: dict[str, float] = {}  # tenant -> requests started, decaying with START_MEMORY_S
        self.starts_at = clock()
        self.waiting = FairQueue(policy)  # the loop's
        self.places = 0  # queue places taken: reserved, or held by a waiting request
        self.held: Counter[str] = Counter()  # places by tenant
        self.closed = False  # set once the loop has ended: no more submissions
        self.lock = threading.Lock()

    # ------------------------------------------------------------ any thread
    def reserve(self, count: int, *, alive: bool, tenant: str = DEFAULT_TENANT) -> None:
        """Take `count` places for requests of `tenant` still being built; QueueFullError at once
        when the queue is full and they do not fit the tenant's fair share."""
        with self.lock:
            if self.closed or not alive:
                raise EngineNotReadyError("The generation engine is not running.")
            if self.refuses(tenant, count):
                raise QueueFullError(self.places, self.max_queue, self.retry_after)
            self.places += count
            self.held[tenant] += count

    def refuses(self, tenant: str = DEFAULT_TENANT, count: int = 1) -> bool:
        """Whether `count` more places for `tenant` would be refused now (reads without the lock
        are only used to refuse early)."""
        if self.places + count <= self.max_queue:
            return False
        active = len({name for name, n in self.held.items() if n > 0} | {tenant})
        return self.held[tenant] + count > math.ceil(self.max_queue / active)

    def release(self, count: int, tenant: str = DEFAULT_TENANT) -> None:
        """Give back places taken by `reserve` for requests that will not be submitted."""
        with self.lock:
            self.places -= count
            self.held[tenant] -= count

    def hand_over(self, request: GenerationRequest, deliver) -> None:
        """A reserved place passes to `request`, which `deliver` puts in the loop's inbox, in one step
        against closing (ShuttingDownError once closed)."""
        with self.lock:
            if self.closed:
                self.places -= 1
                self.held[request.tenant] -= 1
                raise ShuttingDownError("The server is shutting down.")
            request.holds_queue_place = True
            deliver(request)

    def cancel(self, request: GenerationRequest) -> None:
        """Mark `request` cancelled; a request still waiting gives its place back now, so a client
        that left (or a cancelled evaluation job) never holds places while the batch is full."""
        with self.lock:
            request.cancelled = True
            self._give_back_place(request)

    def waiting_count(self) -> int:
        with self.lock:
            return self.places

    def close(self) -> None:
        with self.lock:
            self.closed = True

    # ------------------------------------------------------------ the loop's thread
    def admit(self, free_rows: int, running: Counter[str] | None = None, fits=None) -> list[GenerationRequest]:
        """The waiting requests that join the batch now (their places freed); cancelled ones end here.

        With `fits(requests)` (the backend's: do these new rows' key/values fit beside the running
        ones?), admission stops at the first request that does not fit; it stays first in line.

        Under the `fair` policy the batch's rows are shared too: with `running` (rows by tenant), while
        any other tenant is active a tenant holds at most its share of them, the batch's rows divided
        by the active tenants, and no more than the most demanding other tenant asks for (its rows
        running and waiting, the highest in the last DEMAND_MEMORY_S: a client between its answer
        and its next request still counts): rows stay free rather than go to it. A tenant that
        `flooding` says retries refused requests at once gets `flood_rows` of that (at least one
        row), and while another tenant is active it starts at most `flood_rows` requests for each
        request the most active other tenant starts (plus one, counted over START_MEMORY_S), and
        only in a prefill pass that another tenant's request starts too, or in one of its own at
        most once in FLOOD_RIDE_S. Alone, a tenant may fill the batch. A flood beside a key that
        runs 4 requests then runs 1 row, not 12, for an eighth of that key's requests, and adds
        its prompts' tokens to that key's prefill passes rather than passes of its own: every row
        and every pass it adds slows every step of the other key's requests
        (bench/tenants_bench.py measures the other key's goodput beside a flood)."""
        if any(request.cancelled for request in self.waiting):  # ended now, not when a batch row frees up
            for request in self.waiting.drop(lambda r: r.cancelled):
                with self.lock:
                    self._give_back_place(request)
                request.send(cancelled_event(request))
        holding = Counter(running or {})
        rows = free_rows + sum(holding.values())
        shared = self.waiting.policy == "fair" and running is not None
        now = self.clock()
        self._decay_starts(now)
        demand = self._demand(holding, now) if shared else {}
        active = set(demand)  # every tenant running or waiting now is in it (under_share runs only when shared)

        def under_share(tenant: str) -> bool:
            share = math.ceil(rows / max(1, len(active)))
            others = active - {tenant}
            if others:  # beside others, no more rows than the most demanding of them asks for
                asked = max(max(holding[t] + self.waiting.count(t), demand.get(t, 0)) for t in others)
                if self.flooding(tenant):
                    asked = max(1, math.ceil(asked * self.flood_rows))
                share = min(share, asked)
            return holding[tenant] < share

        others_start = shared and any(not self.flooding(t) and under_share(t) for t in self.waiting.tenants())

        solo: dict[str, bool] = {}  # flooding tenant -> whether it may start a pass of its own now

        def may_start(tenant: str) -> bool:
            if not under_share(tenant):
                return False
            if not self.flooding(tenant):
                return True
            others = active - {tenant}
            if (
                others
                and self.starts.get(tenant, 0.0) >= self.flood_rows * max(self.starts.get(t, 0.0) for t in others) + 1
            ):
                return False  # its share of the starts is used up: the others' requests go first
            if others_start:
                return True
            if tenant not in solo:  # decided once a call: the whole pass is its own
                alone = not active - {tenant}
                solo[tenant] = alone or now - self.own_pass.get(tenant, -math.inf) >= FLOOD_RIDE_S
                if solo[tenant] and not alone:
                    self.own_pass[tenant] = now
            return solo[tenant]

        admitted: list[GenerationRequest] = []
        while self.waiting and len(admitted) < free_rows:
            request = self.waiting.popleft(may_start if shared else None)
            if request is None:  # every waiting tenant holds its share: the free rows are the others'
                break
            if not request.cancelled and fits is not None and not fits(admitted + [request]):
                self.waiting.push_front(request)
                break
            with self.lock:
                self._give_back_place(request)
            if request.cancelled:
                request.send(cancelled_event(request))
                continue
            holding[request.tenant] += 1
            self.starts[request.tenant] = self.starts.get(request.tenant, 0.0) + 1
            admitted.append(request)
        return admitted

    def _decay_starts(self, now: float) -> None:
        """Age the start counts: each start counts e^(-age / START_MEMORY_S)."""
        factor = math.exp(-max(0.0, now - self.starts_at) / START_MEMORY_S)
        self.starts_at = now
        self.starts = {t: n * factor for t, n in self.starts.items() if n * factor > 1e-3}

    def _demand(self, holding: Counter[str], now: float) -> dict[str, int]:
        """Each tenant's highest demand (rows running + waiting) seen in the last DEMAND_MEMORY_S,
        tenants with none now included: between a client's answer and its next request its key
        holds nothing, and without this memory a flood would take every free row in that gap."""
        for tenant in {t for t, n in holding.items() if n > 0} | self.waiting.tenants():
            asks = holding[tenant] + self.waiting.count(tenant)
            seen, peak = self.peaks.get(tenant, (now, 0))
            if asks >= peak or now - seen > DEMAND_MEMORY_S:
                self.peaks[tenant] = (now, asks)
        for tenant in [t for t, (seen, _) in self.peaks.items() if now - seen > DEMAND_MEMORY_S]:
            del self.peaks[tenant]
        return {tenant: peak for tenant, (_, peak) in self.peaks.items()}

    def _give_back_place(self, request: GenerationRequest) -> None:
        """Under the lock: free the place a waiting request holds (once)."""
        if request.holds_queue_place:
            request.holds_queue_place = False
            self.places -= 1
            self.held[request.tenant] -= 1


def cancelled_event(request: GenerationRequest) -> DoneEvent:
    """The final event of a request cancelled while it waited."""
    return DoneEvent(
        text="",
        finish_reason="cancelled",
        prompt_tokens=request.prompt_tokens,
        soft_prompt_tokens=request.soft_len,
        completion_tokens=0,
        queue_ms=0.0,
        ttft_ms=0.0,
        prefill_ms=0.0,
        decode_ms=0.0,
        total_ms=0.0,
    )

"""The waiting requests, one queue per tenant (client key name), served round-robin.

With the `fair` policy a tenant that sends more waits longer, not everyone else: admission
takes the next request of each tenant in turn, passing over tenants that already hold their
share of the batch (scheduler.py). `fifo` keeps one queue in arrival order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator

from server.engine.sequence import GenerationRequest

POLICIES = ("fair", "fifo")


class FairQueue:
    def __init__(self, policy: str = "fair"):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r} (use {', '.join(POLICIES)})")
        self.policy = policy
        self._queues: OrderedDict[str, deque[GenerationRequest]] = OrderedDict()  # rotation order

    def _key(self, request: GenerationRequest) -> str:
        return request.tenant if self.policy == "fair" else ""

    def append(self, request: GenerationRequest) -> None:
        self._queues.setdefault(self._key(request), deque()).append(request)

    def popleft(self, eligible=None) -> GenerationRequest | None:
        """The next tenant's oldest request; that tenant goes to the back of the rotation. With
        `eligible(tenant)`, tenants for which it is false are passed over (None if all are)."""
        key = next((k for k in self._queues if eligible is None or eligible(k)), None)
        if key is None:
            return None
        queue = self._queues[key]
        request = queue.popleft()
        del self._queues[key]
        if queue:
            self._queues[key] = queue
        return request

    def push_front(self, request: GenerationRequest) -> None:
        """Put back a request just taken (it could not start yet): first in its queue, and its
        tenant first in the rotation again."""
        key = self._key(request)
        queue = self._queues.pop(key, deque())
        queue.appendleft(request)
        self._queues[key] = queue
        self._queues.move_to_end(key, last=False)

    def drop(self, unwanted) -> list[GenerationRequest]:
        """Remove and return the requests for which `unwanted(request)` holds."""
        dropped = []
        for key in list(self._queues):
            kept = deque()
            for request in self._queues[key]:
                (dropped if unwanted(request) else kept).append(request)
            if kept:
                self._queues[key] = kept
            else:
                del self._queues[key]
        return dropped

    def clear(self) -> None:
        self._queues.clear()

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def count(self, tenant: str) -> int:
        """Requests of `tenant` waiting (under `fifo`, all of them)."""
        queue = self._queues.get(tenant if self.policy == "fair" else "")
        return len(queue) if queue else 0

    def tenants(self) -> set[str]:
        """The tenants with requests waiting (one queue under `fifo`)."""
        return set(self._queues)

    def __iter__(self) -> Iterator[GenerationRequest]:
        for queue in self._queues.values():
            yield from queue

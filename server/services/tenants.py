"""Who is asking, and whether they may ask now: client keys with names, and per-key limits.

`SOFTPROMPT_CLIENT_KEYS` is a comma-separated list of `name=key` (or bare keys, named
`key-<first 8 hex of the key's SHA-256>`); the name is what metrics and logs show, never the
key. Requests without client keys configured belong to `anonymous`, the admin key's to `admin`.

`SOFTPROMPT_KEY_LIMITS` (JSON) bounds each name: `{"default": {...}, "alice": {...}}` with
`concurrent` (requests in flight: waiting or generating), `requests_per_second` (a token bucket
holding a second's worth) and `tokens_per_minute` (generated tokens, a bucket holding a minute's
worth, charged as requests finish). Unset limits are unbounded. A refusal says how long to wait.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from dataclasses import dataclass

from server.settings import ADMIN, ANONYMOUS

FLOOD_HOLD_S = 2.0  # a key refused over its burst counts as flooding for this long after


class RateLimitedError(Exception):
    """A key is over one of its limits: 429 with Retry-After."""

    code = "rate_limited"

    def __init__(self, tenant: str, limit: str, retry_after: int):
        self.tenant, self.limit, self.retry_after = tenant, limit, retry_after
        what = {
            "concurrent": "requests in flight",
            "requests_per_second": "requests per second",
            "tokens_per_minute": "generated tokens per minute",
        }[limit]
        super().__init__(f"Key {tenant!r} is over its limit of {what}; retry after {retry_after} s.")


@dataclass
class Bucket:
    """A token bucket: `rate` tokens a second, at most `capacity` held."""

    rate: float
    capacity: float
    tokens: float = 0.0
    stamp: float | None = None  # when it was last refilled; full until then

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        if self.stamp is not None:
            self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` tokens are there (0: they are now)."""
        self._refill(now)
        return 0.0 if self.tokens >= amount else (amount - self.tokens) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount  # may go below zero: a long answer is paid for after it was given


class Tenant:
    """One key's state: requests in flight, its buckets, and its refusals in the current second."""

    def __init__(self, name: str, limits: dict[str, float]):
        self.name, self.limits = name, limits
        self.in_flight = 0
        self.refusal_second, self.refusals = 0, 0
        self.flooding_seconds = 0  # consecutive seconds this key has been refused over its burst
        self.flooding_until = 0.0  # flooding() holds until then (FLOOD_HOLD_S after its last refusal over the burst)
        rps, tpm = limits.get("requests_per_second"), limits.get("tokens_per_minute")
        self.requests = Bucket(rps, max(1.0, rps)) if rps else None
        self.tokens = Bucket(tpm / 60.0, tpm) if tpm else None


class Tenants:
    def __init__(self, client_keys: dict[str, str], admin_key: str | None, limits: dict[str, dict[str, float]]):
        self.client_keys, self.admin_key = client_keys, admin_key
        default = limits.get("default", {})
        self._tenants = {
            name: Tenant(name, {**default, **limits.get(name, {})}) for name in (*client_keys, ANONYMOUS, ADMIN)
        }
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._tenants)

    def identify(self, authorization: str) -> str | None:
        """The name of the key in an `Authorization` header; `anonymous` when no client keys are
        required; None for a missing or wrong key when they are. Every key is compared in constant
        time, whatever the first comparisons found."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip().encode() if scheme.lower() == "bearer" else b""
        candidates = list(self.client_keys.items()) + ([(ADMIN, self.admin_key)] if self.admin_key else [])
        matches = [name for name, key in candidates if hmac.compare_digest(token, key.encode())]
        if matches:
            return matches[0]
        return ANONYMOUS if not self.client_keys else None

    def acquire(self, name: str, now: float | None = None) -> None:
        """Count a request of `name` in (RateLimitedError, with the wait, when a limit says no)."""
        now = time.monotonic() if now is None else now
        tenant = self._tenants[name]
        with self._lock:
            concurrent = tenant.limits.get("concurrent")
            if concurrent is not None and tenant.in_flight >= concurrent:
                raise RateLimitedError(name, "concurrent", 1)
            for bucket, limit, amount in (
                (tenant.tokens, "tokens_per_minute", 1e-9),
                (tenant.requests, "requests_per_second", 1),
            ):
                if bucket is not None:
                    wait = bucket.wait_for(amount, now)
                    if wait > 0:
                        raise RateLimitedError(name, limit, max(1, math.ceil(wait)))
            if tenant.requests is not None:
                tenant.requests.take(1, now)
            tenant.in_flight += 1

    def release(self, name: str) -> None:
        """A request of `name` ended (answered, refused later, or its client left)."""
        with self._lock:
            self._tenants[name].in_flight -= 1

    def refusal_delay(self, name: str, burst: int, base_s: float, now: float | None = None) -> float:
        """Count a refusal of `name`; the seconds to sleep before answering it. Nothing for its first
        `burst` refusals in a second; past them (a client retrying at once) `base_s`, doubled for each
        further second in a row the key stays over its burst, up to 8 x `base_s`: a flood that keeps
        on costs the server fewer and fewer refusals a second."""
        now = time.monotonic() if now is None else now
        second = int(now)
        tenant = self._tenants.get(name)
        if tenant is None:
            return 0.0
        with self._lock:
            if tenant.refusal_second != second:
                over = tenant.refusals > burst and second == tenant.refusal_second + 1
                tenant.flooding_seconds = tenant.flooding_seconds + 1 if over else 0
                tenant.refusal_second, tenant.refusals = second, 0
            tenant.refusals += 1
            if tenant.refusals <= burst:
                return 0.0
            tenant.flooding_until = now + FLOOD_HOLD_S
            return base_s * 2 ** min(tenant.flooding_seconds, 3)

    def flooding(self, name: str, now: float | None = None) -> bool:
        """Whether `name` was refused over its burst of refusals in a second within the last
        FLOOD_HOLD_S: a client retrying refused requests at once (held that long so that the flag does
        not flicker off between seconds, or while the flood waits out its slow refusals)."""
        tenant = self._tenants.get(name)
        return tenant is not None and (time.monotonic() if now is None else now) < tenant.flooding_until

    def charge(self, name: str, generated_tokens: int, now: float | None = None) -> None:
        """`name` was given `generated_tokens` (its tokens-per-minute bucket pays for them)."""
        tenant = self._tenants.get(name)
        if tenant is not None and tenant.tokens is not None and generated_tokens:
            with self._lock:
                tenant.tokens.take(generated_tokens, time.monotonic() if now is None else now)

"""Token buckets: per-API-key limits on requests and tokens per minute (refusals carry a Retry-After)."""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

__all__ = ["TokenBucket", "KeyRateLimiter"]


class TokenBucket:
    """A bucket of ``capacity`` tokens refilled at ``rate_per_s``; :meth:`take` spends or tells how long to wait."""

    def __init__(self, capacity: float, rate_per_s: float, clock: Callable[[], float] = time.monotonic):
        if capacity <= 0 or rate_per_s <= 0:
            raise ValueError(f"capacity ({capacity}) and rate ({rate_per_s}) must be positive")
        self.capacity = float(capacity)
        self.rate = float(rate_per_s)
        self._clock = clock
        self._level = float(capacity)
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self, amount: float) -> float:
        """Spend ``amount``; returns 0.0 when done, else the seconds until it could be spent (nothing spent).

        An amount above the capacity can never be spent: returns ``inf``.
        """
        if amount > self.capacity:
            return math.inf
        self._refill()
        if self._level >= amount:
            self._level -= amount
            return 0.0
        return (amount - self._level) / self.rate

    def give_back(self, amount: float) -> None:
        """Return ``amount`` unspent tokens (up to the capacity)."""
        self._refill()
        self._level = min(self.capacity, self._level + max(0.0, amount))


class KeyRateLimiter:
    """Requests-per-minute and tokens-per-minute buckets per client (0 = that limit is off)."""

    def __init__(self, requests_per_minute: float = 0.0, tokens_per_minute: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    def admit(self, client: str, tokens: int) -> tuple[str, float] | None:
        """Charge one request and ``tokens`` tokens to ``client``.

        Returns ``None`` when admitted, else ``(which limit, seconds to wait)`` with nothing charged.
        """
        with self._lock:
            req = tok = None
            if self.rpm > 0:
                req = self._requests.setdefault(client, TokenBucket(self.rpm, self.rpm / 60.0, self._clock))
                wait = req.take(1)
                if wait > 0:
                    return "requests", wait
            if self.tpm > 0:
                tok = self._tokens.setdefault(client, TokenBucket(self.tpm, self.tpm / 60.0, self._clock))
                wait = tok.take(tokens)
                if wait > 0:
                    if req is not None:
                        req.give_back(1)
                    return "tokens", wait
            return None

    def refund(self, client: str, tokens: int) -> None:
        """Give back tokens charged but not used (max_tokens beyond what was generated)."""
        if self.tpm > 0 and tokens > 0:
            with self._lock:
                bucket = self._tokens.get(client)
                if bucket is not None:
                    bucket.give_back(tokens)

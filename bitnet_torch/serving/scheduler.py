"""Continuous batching over a :class:`~bitnet_torch.serving.backend.Decoder`, free of HTTP.

One scheduler owns the decoder. Each step it (1) takes new requests and cancellations, ends timed-out ones,
(2) gives free slots to waiting requests in arrival order, (3) prefills up to ``prefill_chunk`` prompt tokens
(whole chunks at fixed boundaries ``[k*chunk, (k+1)*chunk)`` of each prompt, so a long prompt never freezes
the others and a prompt's arithmetic never depends on the load), then (4) decodes one token for every sequence
past its prefill in one ``decode`` call. Finished and cancelled sequences leave the batch at once.

Sampling (temperature, top-k, top-p with the request's own ``torch.Generator``; greedy = argmax), stop strings,
EOS and ``max_tokens`` are applied here to the logits the decoder returns. With a batch-invariant decoder a
request's tokens are the same alone or among any others. Results go to a per-request ``sink`` callable
(called from the scheduler thread) as :class:`Event` objects.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Callable, Iterable, Sequence

import torch

from .backend import Decoder
from .metrics import ServingMetrics

__all__ = ["SamplingParams", "Event", "QueueFull", "Scheduler", "sample_token"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass
class Event:
    """Output of one step for one request: new text and token ids; ``finish_reason`` set on the last event.

    ``finish_reason``: ``stop`` (EOS or a stop string), ``length`` (max_tokens or the KV cache is full),
    ``abort`` (cancelled), ``timeout``, ``error`` (``error`` holds the message).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    #: on the last event: ``queue_s``, ``ttft_s`` (None without a token), ``e2e_s``
    timings: dict[str, float | None] | None = None


class QueueFull(Exception):
    """The waiting queue is full; ``retry_after`` says when to try again (seconds)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from fp32 ``logits [vocab]``: argmax when greedy, else temperature, top-k, top-p, multinomial."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Sequence:
    """Book-keeping for one request inside the scheduler."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None],
                 arrival: float, deadline: float | None):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.sink = sink
        self.arrival = arrival
        self.deadline = deadline
        self.slot: int | None = None
        self.prefilled = 0
        self.output: list[int] = []
        self.pending: int | None = None  # sampled, not yet in the KV cache
        self.emitted_chars = 0
        self.text = ""
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finish_reason: str | None = None
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = None if params.greedy else torch.Generator().manual_seed(seed)


class Scheduler:
    """Continuous batching of requests over one decoder (see the module docstring).

    Args:
        decoder: the :class:`~bitnet_torch.serving.backend.Decoder` (owned by this scheduler from now on).
        decode_text: token ids -> text (the tokenizer's ``decode`` without special tokens).
        eos_token_ids: tokens that end a sequence (unless ``ignore_eos``).
        max_queue: requests waiting for a slot before :meth:`submit` refuses (:class:`QueueFull`).
        prefill_chunk: prompt tokens prefilled per step.
        metrics: Prometheus metrics to update (optional).

    Use :meth:`start` for a background thread, or call :meth:`step` yourself (tests).
    """

    def __init__(self, decoder: Decoder, decode_text: Callable[[list[int]], str], eos_token_ids: Iterable[int],
                 max_queue: int = 64, prefill_chunk: int = 256, metrics: ServingMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.decoder = decoder
        self.decode_text = decode_text
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: collections.deque[_Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._known: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.max_running_seen = 0
        self.failure: BaseException | None = None

    # ----------------------------------------------------------------------------------- public, any thread
    def submit(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
               sink: Callable[[Event], None], timeout_s: float | None = None) -> None:
        """Queue a request. Refuses an empty prompt, a prompt + max_tokens beyond the KV cache, a duplicate id
        (``ValueError``), and a full queue (:class:`QueueFull`)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty (at least one token is needed)")
        vocab = self.decoder.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > self.decoder.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.decoder.max_seq_len} tokens")
        now = self.clock()
        seq = _Sequence(request_id, prompt, params, sink, now, now + timeout_s if timeout_s else None)
        with self._wake:
            if self._stop:
                raise QueueFull("the server is shutting down", retry_after=5.0)
            if request_id in self._known:
                raise ValueError(f"request id {request_id!r} is already in use")
            waiting = len(self._waiting) + len(self._incoming)
            free = self.decoder.max_batch_size - len(self._running)
            if waiting - free >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting for "
                                f"{self.decoder.max_batch_size} sequences)")
            self._known.add(request_id)
            self._incoming.append(seq)
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Cancel a request (its sequence leaves the batch at the next step; its sink gets ``abort``)."""
        with self._wake:
            if request_id in self._known:
                self._cancelled.add(request_id)
                self._wake.notify()

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._incoming)

    def start(self) -> None:
        """Run :meth:`step` in a daemon thread until :meth:`shutdown`."""
        if self._thread is not None:
            raise RuntimeError("the scheduler is already running")
        self._thread = threading.Thread(target=self._loop, name="bitnet-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop taking requests, cancel the remaining ones (``abort``), stop the thread."""
        with self._wake:
            self._stop = True
            self._cancelled.update(self._known)
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("the scheduler thread did not stop within %.1f s", timeout_s)
        else:
            self.step()

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running (False after a crash, see ``failure``)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop

    # ------------------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._incoming or self._cancelled or self._running or self._waiting or self._stop):
                    self._wake.wait(timeout=1.0)
                if self._stop and not (self._incoming or self._cancelled or self._running or self._waiting):
                    return
            try:
                self.step()
            except BaseException as exc:  # noqa: BLE001 - one bad step must not kill the server silently
                logger.exception("scheduler step failed; failing the requests in the batch")
                self.failure = exc
                self._fail_all(f"internal error in the decoder: {type(exc).__name__}: {exc}")

    def _fail_all(self, message: str) -> None:
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, "error", error=message)
        self._waiting.clear()

    def step(self) -> bool:
        """One scheduling step; returns whether there was any work."""
        with self._wake:
            while self._incoming:
                self._waiting.append(self._incoming.popleft())
            cancelled, self._cancelled = self._cancelled, set()
        now = self.clock()
        for seq in list(self._running) + list(self._waiting):
            if seq.request_id in cancelled:
                self._finish(seq, "abort")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "timeout")
        self._admit(now)
        worked = self._prefill()
        worked = self._decode() or worked
        self.steps += 1
        self._update_gauges()
        return worked

    def _update_gauges(self) -> None:
        self.max_running_seen = max(self.max_running_seen, len(self._running))
        if self.metrics is not None:
            self.metrics.running.set(len(self._running))
            self.metrics.waiting.set(self.num_waiting)

    def _admit(self, now: float) -> None:
        while self._waiting and len(self._running) < self.decoder.max_batch_size:
            seq = self._waiting.popleft()
            seq.slot = self.decoder.allocate()
            seq.admitted_at = now
            if self.metrics is not None:
                self.metrics.queue_time.observe(now - seq.arrival)
            self._running.append(seq)

    def _prefill(self) -> bool:
        budget = self.prefill_chunk
        worked = False
        for seq in list(self._running):
            if seq.prefilled >= len(seq.prompt) or seq.finish_reason is not None:
                continue
            if worked and budget < min(self.prefill_chunk, len(seq.prompt) - seq.prefilled):
                break
            end = min(seq.prefilled + self.prefill_chunk, len(seq.prompt))
            logits = self.decoder.prefill(seq.slot, seq.prompt[seq.prefilled:end])
            budget -= end - seq.prefilled
            seq.prefilled = end
            worked = True
            if self.metrics is not None and end == len(seq.prompt):
                self.metrics.prompt_tokens.inc(len(seq.prompt))
            if end == len(seq.prompt):
                self._accept(seq, logits)
            if budget <= 0:
                break
        return worked

    def _decode(self) -> bool:
        batch = [s for s in self._running if s.pending is not None and s.finish_reason is None]
        if not batch:
            return False
        logits = self.decoder.decode([s.slot for s in batch], [s.pending for s in batch])
        for seq, row in zip(batch, logits):
            self._accept(seq, row)
        return True

    # ------------------------------------------------------------------------------------ per token
    def _accept(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample the next token of ``seq`` from ``logits`` and emit what it adds (and its end, if it ends)."""
        token = sample_token(logits, seq.params, seq.generator)
        now = self.clock()
        if self.metrics is not None:
            if seq.first_token_at is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
            self.metrics.generation_tokens.inc()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now
        seq.output.append(token)
        seq.pending = token
        reason = None
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            reason = "stop"
            text_ids = seq.output[:-1]
        else:
            text_ids = seq.output
        if reason is None and len(seq.output) >= seq.params.max_tokens:
            reason = "length"
        if reason is None and self.decoder.length(seq.slot) + 1 > self.decoder.max_seq_len:
            reason = "length"
        text = self.decode_text(text_ids)
        stop_at = self._find_stop(seq, text)
        if stop_at is not None:
            text, reason = text[:stop_at], "stop"
        seq.text = text
        if reason is not None:
            self._finish(seq, reason, new_token=token)
            return
        # Hold back an incomplete UTF-8 character and any tail that could start a stop string.
        safe = len(text.rstrip("\ufffd"))
        hold = max((len(s) - 1 for s in seq.params.stop), default=0)
        safe = max(seq.emitted_chars, min(safe, len(text) - hold))
        delta = text[seq.emitted_chars:safe]
        seq.emitted_chars = safe
        try:
            seq.sink(Event(delta, [token], len(seq.prompt), len(seq.output)))
        except Exception:  # noqa: BLE001 - a broken sink cancels its own request only
            logger.exception("the sink of request %s failed; cancelling it", seq.request_id)
            self._finish(seq, "abort")

    @staticmethod
    def _find_stop(seq: _Sequence, text: str) -> int | None:
        if not seq.params.stop:
            return None
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, seq.emitted_chars - longest)
        hits = [i for i in (text.find(s, start) for s in seq.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _finish(self, seq: _Sequence, reason: str, new_token: int | None = None, error: str | None = None) -> None:
        """Take ``seq`` out of the batch (free its slot) and send its last event."""
        if seq.finish_reason is not None:
            return
        seq.finish_reason = reason
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq.slot is not None:
            self.decoder.release(seq.slot)
            seq.slot = None
        with self._lock:
            self._known.discard(seq.request_id)
            self._cancelled.discard(seq.request_id)
        if self.metrics is not None and reason in ("stop", "length", "abort", "timeout"):
            self.metrics.finished(reason)
            self.metrics.e2e.observe(self.clock() - seq.arrival)
        delta = seq.text[seq.emitted_chars:] if reason in ("stop", "length") else ""
        seq.emitted_chars = len(seq.text)
        tokens = [new_token] if new_token is not None else []
        now = self.clock()
        timings = {
            "queue_s": (seq.admitted_at if seq.admitted_at is not None else now) - seq.arrival,
            "ttft_s": seq.first_token_at - seq.arrival if seq.first_token_at is not None else None,
            "e2e_s": now - seq.arrival,
        }
        try:
            seq.sink(Event(delta, tokens, len(seq.prompt), len(seq.output), finish_reason=reason, error=error,
                           timings=timings))
        except Exception:  # noqa: BLE001 - a broken sink must not stop the others
            logger.exception("the sink of request %s failed", seq.request_id)

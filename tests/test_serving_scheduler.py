"""The serving scheduler and decoder without HTTP: continuous batching, chunked prefill, batch invariance, sampling,
stop strings, EOS, cancellation, timeouts, queue limits; the token buckets of the rate limiter."""

from __future__ import annotations

import math
import time

import pytest
import torch

pytest.importorskip("prometheus_client")

from bitnet_torch.serving.backend import ModelDecoder, eos_token_ids, load_model, make_decoder  # noqa: E402
from bitnet_torch.serving.limits import KeyRateLimiter, TokenBucket  # noqa: E402
from bitnet_torch.serving.metrics import ServingMetrics  # noqa: E402
from bitnet_torch.serving.scheduler import QueueFull, SamplingParams, Scheduler, sample_token  # noqa: E402
from test_gguf_helpers import make_tiny_checkpoint  # noqa: E402

PROMPTS = ["In the beginning God", "And the earth was without form", "Let there be light", "User: What is"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # One thread: a tiny model's ops are too small to split, and on a loaded machine OpenMP barriers between
    # two threads cost 100x the op itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("serving") / "packed", form="packed")
    model, tokenizer = load_model(path)
    yield model, tokenizer
    torch.set_num_threads(threads)


def _generate(model, ids, max_new_tokens, eos):
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(ids):].tolist()


def _scheduler(model, tokenizer, batch=4, seq_len=128, eos=None, **kw):
    decoder = ModelDecoder(model, batch, seq_len)
    eos = eos_token_ids(model, tokenizer) if eos is None else eos
    return Scheduler(decoder, lambda ids: tokenizer.decode(ids, skip_special_tokens=True), eos, **kw)


class Collector:
    """A sink that records every event of one request."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def tokens(self):
        return [t for e in self.events for t in e.token_ids]

    @property
    def text(self):
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self):
        return self.events[-1].finish_reason if self.events else None


def _drain(scheduler, limit=10_000):
    for _ in range(limit):
        if not (scheduler.num_running or scheduler.num_waiting):
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish its requests")


def test_make_decoder_falls_back_to_the_model_forward_without_the_engine(tiny):
    model, _ = tiny
    decoder = make_decoder(model, 2, 64)
    try:
        from bitnet_torch.models.engine import DecodeEngine, engine_supported
    except ImportError:
        assert isinstance(decoder, ModelDecoder)
    else:
        assert isinstance(decoder, DecodeEngine if engine_supported(model)[0] else ModelDecoder)
    assert decoder.max_batch_size == 2 and decoder.max_seq_len == 64 and decoder.vocab_size == model.config.vocab_size


def test_batched_decode_step_is_bitwise_the_per_sequence_forward(tiny):
    """The one-pass batched decode step gives, row by row, the bits of the model's forward on each sequence alone,
    whatever the batch holds (lengths differ, slots join and leave)."""
    model, tokenizer = tiny
    batched, single = ModelDecoder(model, 6, 64), ModelDecoder(model, 6, 64, batched=False)
    assert batched.batched and not single.batched
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] + [[5], list(range(3, 40))]
    slots = {i: (batched.allocate(), single.allocate()) for i in range(len(prompts))}
    tokens = {i: int(batched.prefill(slots[i][0], p).argmax()) for i, p in enumerate(prompts)}
    for i, p in enumerate(prompts):
        single.prefill(slots[i][1], p)
    members = [[0, 1, 2, 3, 4, 5], [5, 2], [3], [0, 1, 2, 3, 4, 5], [4, 0, 3]]
    for rows in members:
        got = batched.decode([slots[i][0] for i in rows], [tokens[i] for i in rows])
        want = single.decode([slots[i][1] for i in rows], [tokens[i] for i in rows])
        assert torch.equal(got, want)
        tokens.update({i: int(r.argmax()) for i, r in zip(rows, got)})


def test_batched_decode_is_refused_for_a_float_head(tiny, tmp_path):
    from bitnet_torch.models import BitNetForCausalLM
    from bitnet_torch.serving.backend import batched_decode_supported

    model, _ = tiny
    path = tmp_path / "m"
    model.save_pretrained(path)
    float_head = BitNetForCausalLM.from_pretrained(path, packed=True, quantize_lm_head=False, quantize_embedding=False)
    supported, why = batched_decode_supported(float_head)
    assert not supported and "head" in why
    assert not ModelDecoder(float_head, 2, 32).batched
    with pytest.raises(ValueError, match="not bitwise batch-invariant"):
        ModelDecoder(float_head, 2, 32, batched=True)
    assert batched_decode_supported(model) == (True, "")


def test_decoder_slots_logits_are_bitwise_the_same_alone_and_in_a_batch(tiny):
    model, tokenizer = tiny
    decoder = ModelDecoder(model, 4, 64)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    slots = [decoder.allocate() for _ in prompts]
    firsts = [int(decoder.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
    batched = decoder.decode(slots, firsts)
    alone = ModelDecoder(model, 1, 64)
    for i, prompt in enumerate(prompts):
        slot = alone.allocate()
        alone.prefill(slot, prompt)
        assert torch.equal(alone.decode([slot], [firsts[i]])[0], batched[i])
        assert alone.length(slot) == len(prompt) + 1 == decoder.length(slots[i])
        alone.release(slot)
    with pytest.raises(RuntimeError, match="slots are in use"):
        decoder.allocate()
    with pytest.raises(ValueError, match="one token per slot"):
        decoder.decode(slots, firsts[:1])
    decoder.release(slots[0])
    with pytest.raises(KeyError, match="not allocated"):
        decoder.release(slots[0])


@pytest.mark.parametrize("chunk", [3, 256])
def test_continuous_batching_gives_each_request_its_greedy_generate_tokens(tiny, chunk):
    """Requests arriving at different steps, prefilled in chunks, decoded together: each gets the tokens of
    model.generate on its prompt alone."""
    model, tokenizer = tiny
    eos = eos_token_ids(model, tokenizer)
    scheduler = _scheduler(model, tokenizer, batch=3, prefill_chunk=chunk, metrics=ServingMetrics("tiny"))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS] * 2
    expected = [_generate(model, ids, 12, eos) for ids in prompts[:4]] * 2
    sinks = []
    for i, ids in enumerate(prompts):
        sinks.append(Collector())
        scheduler.submit(f"r{i}", ids, SamplingParams(max_tokens=12, temperature=0), sinks[-1])
        for _ in range(i % 3):  # arrivals spread over steps: later requests join a running batch
            scheduler.step()
    _drain(scheduler)
    assert scheduler.max_running_seen == 3
    for sink, want in zip(sinks, expected):
        assert sink.tokens == want
        assert sink.finish_reason == ("stop" if want[-1] in eos else "length")
        assert sink.text == tokenizer.decode(want, skip_special_tokens=True)
        assert sink.events[-1].completion_tokens == len(want)
    assert scheduler.metrics.generation_tokens._value.get() == sum(len(w) for w in expected)
    assert scheduler.metrics.prompt_tokens._value.get() == sum(len(p) for p in prompts)


def test_eos_ends_a_sequence_without_its_text(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[0])["input_ids"]
    free = _generate(model, ids, 10, [10_000])
    stop_token = free[3]
    first = free.index(stop_token)
    scheduler = _scheduler(model, tokenizer, eos=[stop_token])
    sink = Collector()
    scheduler.submit("a", ids, SamplingParams(max_tokens=10, temperature=0), sink)
    ignoring = Collector()
    scheduler.submit("b", ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), ignoring)
    _drain(scheduler)
    assert sink.tokens == free[: first + 1] and sink.finish_reason == "stop"
    assert sink.text == tokenizer.decode(free[:first], skip_special_tokens=True)
    assert ignoring.tokens == free and ignoring.finish_reason == "length"


def test_stop_string_cuts_the_text_and_is_never_streamed(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[1])["input_ids"]
    scheduler = _scheduler(model, tokenizer)
    full = Collector()
    scheduler.submit("full", ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), full)
    _drain(scheduler)
    text = full.text
    start = next(i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip())
    stop = text[start:start + 2]
    cut = Collector()
    scheduler.submit("cut", ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(stop, "never")),
                     cut)
    _drain(scheduler)
    assert cut.text == text[: text.find(stop)]
    assert cut.finish_reason == "stop"
    assert all(stop not in e.text for e in cut.events)


def test_seeded_sampling_is_reproducible_alone_and_among_others(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[2])["input_ids"]
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    scheduler = _scheduler(model, tokenizer)
    alone = Collector()
    scheduler.submit("alone", ids, params, alone)
    _drain(scheduler)
    crowd = [Collector() for _ in range(4)]
    for i, sink in enumerate(crowd):
        seed = 7 if i == 2 else 100 + i
        scheduler.submit(f"c{i}", ids, SamplingParams(12, 1.5, 0.95, 50, seed, ignore_eos=True), sink)
    _drain(scheduler)
    assert crowd[2].tokens == alone.tokens
    assert any(c.tokens != alone.tokens for i, c in enumerate(crowd) if i != 2)
    greedy = Collector()
    scheduler.submit("k1", ids, SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True), greedy)
    _drain(scheduler)
    assert greedy.tokens == _generate(model, ids, 12, [10_000])


def test_sample_token_top_p_and_top_k_keep_only_the_head():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    # top-p 0.3: the most likely token alone holds more than 0.3 of the mass
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.3), gen) for _ in range(50)} == {1}
    assert {sample_token(logits, SamplingParams(temperature=1.0, top_k=2), gen) for _ in range(200)} == {1, 2}
    assert sample_token(logits, SamplingParams(temperature=0.0), None) == 1


def test_cancel_and_timeout_free_the_slot(tiny):
    model, tokenizer = tiny
    clock = [0.0]
    scheduler = _scheduler(model, tokenizer, batch=2, seq_len=128, clock=lambda: clock[0],
                           metrics=ServingMetrics("tiny"))
    ids = tokenizer(PROMPTS[0])["input_ids"]
    a, b, c = Collector(), Collector(), Collector()
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    scheduler.submit("a", ids, long, a)
    scheduler.submit("b", ids, long, b, timeout_s=5.0)
    scheduler.submit("c", ids, long, c)  # waits: two slots
    for _ in range(3):
        scheduler.step()
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1
    scheduler.cancel("a")
    scheduler.step()
    assert a.finish_reason == "abort" and len(a.tokens) >= 2
    assert scheduler.num_running == 2 and scheduler.num_waiting == 0  # c took a's slot
    clock[0] = 6.0
    scheduler.step()
    assert b.finish_reason == "timeout"
    scheduler.cancel("c")
    scheduler.step()
    assert scheduler.num_running == 0 and len(scheduler.decoder._free) == 2
    success = {s.labels["finished_reason"]: s.value for s in scheduler.metrics._success.collect()[0].samples
               if s.name.endswith("_total")}
    assert success["abort"] == 2 and success["timeout"] == 1


def test_submit_refuses_a_full_queue_and_bad_prompts(tiny):
    model, tokenizer = tiny
    scheduler = _scheduler(model, tokenizer, batch=1, seq_len=64, max_queue=1)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    p = SamplingParams(max_tokens=8, temperature=0)
    scheduler.submit("a", ids, p, Collector())
    scheduler.submit("b", ids, p, Collector())  # a takes the slot at the next step, b waits
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.submit("c", ids, p, Collector())
    with pytest.raises(ValueError, match="already in use"):
        scheduler.submit("a", ids, p, Collector())
    with pytest.raises(ValueError, match="empty"):
        scheduler.submit("d", [], p, Collector())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        scheduler.submit("d", [model.config.vocab_size], p, Collector())
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        scheduler.submit("d", ids, SamplingParams(max_tokens=60), Collector())
    _drain(scheduler)


def test_a_full_kv_cache_ends_with_length(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[0])["input_ids"]
    scheduler = _scheduler(model, tokenizer, batch=1, seq_len=len(ids) + 5)
    sink = Collector()
    scheduler.submit("a", ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), sink)
    _drain(scheduler)
    assert len(sink.tokens) == 5 and sink.finish_reason == "length"


def test_a_failing_decoder_step_fails_its_requests_and_the_scheduler_serves_on(tiny):
    model, tokenizer = tiny

    class BrokenOnce(ModelDecoder):
        """A decoder whose first decode call raises (a kernel error), then works."""

        broken = True

        def decode(self, slots, token_ids):
            if self.broken:
                self.broken = False
                raise RuntimeError("kernel failure")
            return super().decode(slots, token_ids)

    decoder = BrokenOnce(model, 2, 64)
    scheduler = Scheduler(decoder, lambda ids: tokenizer.decode(ids), eos_token_ids(model, tokenizer))
    ids = tokenizer(PROMPTS[0])["input_ids"]
    first, second = Collector(), Collector()
    scheduler.start()
    try:
        scheduler.submit("a", ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), first)
        for _ in range(200):
            if first.finish_reason:
                break
            time.sleep(0.01)
        assert first.finish_reason == "error" and "kernel failure" in first.events[-1].error
        scheduler.submit("b", ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), second)
        for _ in range(500):
            if second.finish_reason:
                break
            time.sleep(0.01)
        assert second.finish_reason == "length" and scheduler.alive
    finally:
        scheduler.shutdown()
    assert not scheduler.alive and len(decoder._free) == 2


def test_token_bucket_refills_and_tells_how_long_to_wait():
    now = [0.0]
    bucket = TokenBucket(10, 1.0, clock=lambda: now[0])
    assert bucket.take(10) == 0.0
    assert bucket.take(3) == pytest.approx(3.0)
    now[0] = 3.0
    assert bucket.take(3) == 0.0
    assert math.isinf(bucket.take(11))
    limiter = KeyRateLimiter(requests_per_minute=2, tokens_per_minute=120, clock=lambda: now[0])
    assert limiter.admit("a", 50) is None and limiter.admit("a", 50) is None
    assert limiter.admit("a", 1)[0] == "requests"
    assert limiter.admit("b", 100) is None  # per client
    which, wait = limiter.admit("b", 100)  # b has a request left but only 20 tokens
    assert which == "tokens" and wait == pytest.approx(40.0)
    now[0] = 33.0  # 60 tokens refilled for b in 30 s (and its refused request was not charged)
    which, wait = limiter.admit("b", 100)
    assert which == "tokens" and wait == pytest.approx((100 - 80) / 2.0)
    limiter.refund("b", 20)
    assert limiter.admit("b", 100) is None


def test_load_model_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "m.gguf").write_bytes(b"\0")
    with pytest.raises(ValueError, match="needs a tokenizer directory"):
        load_model(tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_a_gguf_model_serves_its_greedy_generate_tokens(tiny, tmp_path):
    from bitnet_torch.export import export_gguf

    _, tokenizer = tiny
    source = make_tiny_checkpoint(tmp_path / "packed", form="packed")
    export_gguf(source, tmp_path / "m.gguf", type="i2_s")
    model, gguf_tokenizer = load_model(tmp_path / "m.gguf", tokenizer_path=source)
    ids = gguf_tokenizer(PROMPTS[0])["input_ids"]
    scheduler = _scheduler(model, gguf_tokenizer)
    sink = Collector()
    scheduler.submit("a", ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), sink)
    _drain(scheduler)
    assert sink.tokens == _generate(model, ids, 8, [10 ** 6])


def test_serve_command_has_help():
    from bitnet_torch.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0

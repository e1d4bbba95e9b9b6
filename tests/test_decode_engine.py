"""The CPU decode engine (bitnet::decode_step, DecodeEngine, generate() on the engine): issue 12.

Checks: greedy tokens identical to the eager path (a trained tiny model and random odd shapes: GQA ratios 1, 4, 5,
head_dim 64 / 128, vocab not a multiple of 64); logits within the stated float bound; a slot's logits bitwise
identical alone and in any batch (ragged prompts, sequences finishing at different steps, slot reuse); identical
logits on every instruction set; sampling with a seed and logits processors; clear errors; opcheck. Run this file
also with BITNET_TORCH_NO_EXT=1 (the reference op) and BITNET_TORCH_CPU_ISA=avx2 / scalar.

Bound (stated): the engine computes every op as the eager model does (same kernels, same roundings to the model
dtype) except attention, whose fp32 sums and exp differ from SDPA's kernel. In fp32 that moves activations by
float rounding, which can flip an int8 activation code at a rounding boundary; measured logit differences stay
below 1e-4 of the largest logit (asserted: 1e-3). In bf16 the attention output itself is rounded to bf16, and a
one-ulp difference there propagates; asserted: within 0.1 of the largest logit, greedy tokens identical.
"""

from __future__ import annotations

import os

import pytest
import torch

import bitnet_torch
from bitnet_torch import _backend, ops
from bitnet_torch.models import BitNetConfig, BitNetForCausalLM, bitnet_b1_58_2b_4t_config
from bitnet_torch.models.engine import DecodeEngine, EngineCache, decode_path, engine_supported

NO_EXT = not ops.extension_loaded()


def _config(vocab=1001, hidden=128, intermediate=256, layers=2, heads=2, kv_heads=2, head_dim=None, **kw):
    extra = {"head_dim": head_dim} if head_dim is not None else {}
    return bitnet_b1_58_2b_4t_config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, **extra, **kw,
    )


def _model(dtype=torch.float32, seed=0, int8=False, **shape) -> BitNetForCausalLM:
    torch.manual_seed(seed)
    model = BitNetForCausalLM.from_config(_config(**shape), packed=True, dtype=dtype).eval()
    if int8:
        model.quantize_output_layers(lm_head=True, embedding=True)
    return model


# Random odd shapes: (heads, kv_heads, head_dim) gives GQA ratios 1, 4, 5 and head_dim 64 / 128; head_dim 48
# (AVX-512 attention: a last block of one vector) and 40 (not a multiple of 16: the portable attention loops on
# every ISA).
SHAPES = {
    "gqa1_d64": dict(heads=2, kv_heads=2, hidden=128, intermediate=196, vocab=1001),
    "gqa4_d128": dict(heads=4, kv_heads=1, hidden=512, intermediate=260, vocab=517),
    "gqa5_d64": dict(heads=5, kv_heads=1, hidden=320, intermediate=132, vocab=999, layers=3),
    "gqa2_d48": dict(heads=2, kv_heads=1, hidden=96, intermediate=100, vocab=301),
    "gqa3_d40": dict(heads=3, kv_heads=1, hidden=120, intermediate=92, vocab=257),
}


def _greedy(model, ids, n, **kw):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


@pytest.fixture(scope="module")
def trained_model() -> BitNetForCausalLM:
    """A tiny BitNet model trained (QAT, a few seconds) to continue a repeating pattern, then packed."""
    torch.manual_seed(0)
    config = _config(vocab=67, hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1)
    model = BitNetForCausalLM.from_config(config, packed=False, dtype=torch.float32)
    pattern = torch.tensor([3 + (i * 7) % 60 for i in range(40)])
    data = pattern.repeat(2)[None, :64]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        loss = model(data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.pack()
    return model.eval()


# --------------------------------------------------------------------------------------------- equality with eager


def test_trained_model_greedy_tokens_match_eager(trained_model):
    assert engine_supported(trained_model)[0]
    prompt = torch.tensor([[3, 10, 17, 24, 31]])
    eager = _greedy(trained_model, prompt, 64, use_decode_engine=False)
    engine = _greedy(trained_model, prompt, 64, use_decode_engine=True)
    assert torch.equal(engine, eager)
    assert decode_path(trained_model)[0] == "engine"


@pytest.mark.parametrize("shape", list(SHAPES))
def test_random_shapes_greedy_tokens_match_eager(shape):
    model = _model(**SHAPES[shape])
    prompt = torch.randint(3, model.config.vocab_size, (1, 9))
    eager = _greedy(model, prompt, 64, use_decode_engine=False)
    engine = _greedy(model, prompt, 64)  # the default path
    assert torch.equal(engine, eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
def test_logits_within_bound_of_eager(dtype, int8):
    model = _model(dtype=dtype, int8=int8, **SHAPES["gqa4_d128"])
    prompt = torch.randint(3, model.config.vocab_size, (1, 11))
    bound = 1e-3 if dtype == torch.float32 else 0.1
    engine = DecodeEngine(model, 1, 64)
    slot = engine.allocate()
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        cache = out.cache
        eager_logits = [out.logits[0, -1].float()]
        engine_logits = [engine.prefill(slot, prompt[0])]
        token = int(eager_logits[0].argmax())
        for _ in range(12):
            out = model(torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = out.cache
            eager_logits.append(out.logits[0, -1].float())
            engine_logits.append(engine.decode([slot], [token])[0])
            token = int(eager_logits[-1].argmax())
    for step, (a, b) in enumerate(zip(engine_logits, eager_logits)):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= bound * scale, f"step {step}"
        assert int(a.argmax()) == int(b.argmax()), f"step {step}"
    assert engine.length(slot) == 11 + 12


def test_bf16_int8_greedy_tokens_match_eager():
    model = _model(dtype=torch.bfloat16, int8=True, **SHAPES["gqa1_d64"])
    prompt = torch.randint(3, model.config.vocab_size, (1, 6))
    assert torch.equal(_greedy(model, prompt, 24), _greedy(model, prompt, 24, use_decode_engine=False))


# --------------------------------------------------------------------------------------------- batch invariance


def _run_alone(model, prompt, tokens):
    engine = DecodeEngine(model, 1, 64)
    slot = engine.allocate()
    logits = [engine.prefill(slot, prompt)]
    for t in tokens:
        logits.append(engine.decode([slot], [t])[0])
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_equals_one_by_one_bitwise(dtype):
    model = _model(dtype=dtype, int8=dtype == torch.bfloat16, **SHAPES["gqa5_d64"])
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 7, 20, 1, 5)]
    steps = [6, 2, 9, 4, 7]  # sequences finish at different steps
    tokens = [torch.randint(3, vocab, (s,), generator=g).tolist() for s in steps]
    alone = [_run_alone(model, p, t) for p, t in zip(prompts, tokens)]

    engine = DecodeEngine(model, 4, 64)  # fewer slots than sequences: the last one reuses a released slot
    slot_of, got, done = {}, {i: [] for i in range(5)}, set()
    for i in (2, 0, 1, 3):
        slot_of[i] = engine.allocate()
        got[i].append(engine.prefill(slot_of[i], prompts[i]))
    step = 0
    while len(done) < 5:
        active = [i for i in slot_of if i not in done and len(got[i]) - 1 < steps[i]]
        order = active[::-1] if step % 2 else active  # any order
        logits = engine.decode([slot_of[i] for i in order], [tokens[i][len(got[i]) - 1] for i in order])
        for row, i in enumerate(order):
            got[i].append(logits[row])
        for i in list(slot_of):
            if i not in done and len(got[i]) - 1 == steps[i]:
                done.add(i)
                engine.release(slot_of.pop(i))
                if 4 not in slot_of and 4 not in done:  # slot reuse: sequence 4 starts mid-way
                    slot_of[4] = engine.allocate()
                    got[4].append(engine.prefill(slot_of[4], prompts[4]))
        step += 1
    for i in range(5):
        assert len(got[i]) == len(alone[i])
        for a, b in zip(got[i], alone[i]):
            assert torch.equal(a, b), f"sequence {i}"


@pytest.mark.skipif(NO_EXT, reason="the compiled engine's threads")
def test_any_thread_count_gives_the_same_logits_bitwise():
    """Every output of a step is computed by one thread with the same arithmetic whichever thread it is (the
    projections' and the head's chunks are shared with stealing): 1..5 threads give identical logits. More
    threads than cores make threads lose their core mid-phase, so chunks really are stolen."""
    model = _model(dtype=torch.bfloat16, int8=True, **SHAPES["gqa4_d128"])
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 2, 9)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            engine = DecodeEngine(model, 3, 32)
            slots = [engine.allocate() for _ in prompts]
            steps = [torch.stack([engine.prefill(s, p) for s, p in zip(slots, prompts)])]
            for _ in range(6):
                steps.append(engine.decode(slots, steps[-1].argmax(-1).tolist()))
            results.append(steps)
    finally:
        torch.set_num_threads(before)
    for steps in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(steps, results[0]))


def test_chunked_prefill_equals_one_prefill():
    """On the engine op, chunking changes nothing (bitwise); a long prompt into an empty slot goes through the
    model's forward (keys/values handed over): the same numbers within the stated bound, decoding continues."""
    model = _model(**SHAPES["gqa1_d64"])
    prompt = torch.randint(3, model.config.vocab_size, (20,)).tolist()
    on_op = DecodeEngine(model, 1, 32)
    on_op.prefill_with_model_min = None
    slot = on_op.allocate()
    a = on_op.prefill(slot, prompt)
    a_next = on_op.decode([slot], [5])[0]
    chunked = DecodeEngine(model, 1, 32)
    slot = chunked.allocate()
    chunked.prefill(slot, prompt[:7])
    chunked.prefill(slot, prompt[7:8])
    b = chunked.prefill(slot, prompt[8:])
    assert torch.equal(a, b) and chunked.length(slot) == 20
    handed = DecodeEngine(model, 1, 32)
    slot = handed.allocate()
    c = handed.prefill(slot, prompt)
    c_next = handed.decode([slot], [5])[0]
    assert handed.length(slot) == 21
    with torch.inference_mode():
        eager = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1).logits[0, -1].float()
    assert torch.equal(c, eager)  # the model's own forward
    for x, y in ((a, c), (a_next, c_next)):
        assert (x - y).abs().max().item() <= 1e-3 * y.abs().max().item()


@pytest.mark.skipif(NO_EXT, reason="instruction sets of the compiled kernels")
def test_every_instruction_set_gives_the_same_logits():
    model = _model(int8=True, **SHAPES["gqa4_d128"])
    prompt = torch.randint(3, model.config.vocab_size, (5,)).tolist()
    before = _backend.cpu_isa()
    results = {}
    try:
        for isa in _backend.available_cpu_isas():
            _backend.set_cpu_isa(isa)
            results[isa] = _run_alone(model, prompt, [7, 8, 9])
    finally:
        _backend.set_cpu_isa(before)
    # Projections, norms and rotary are exact or the same code on every ISA; attention's fp32 sums are the
    # portable loops on scalar, the AVX2 loops (8 lanes, no fma) on avx2 and the AVX-512 loops (16 lanes, fma)
    # on avx512 / amx, each in another order: equal within a family, within float rounding across them.
    families = {"scalar": "portable", "avx2": "avx2", "avx512": "avx512", "amx": "avx512"}
    reference = {}
    for isa, logits in results.items():
        family = families[isa]
        if family not in reference:
            reference[family] = logits
        assert all(torch.equal(a, b) for a, b in zip(logits, reference[family])), isa
    first = next(iter(results.values()))
    for isa, logits in results.items():
        for a, b in zip(logits, first):
            assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item(), isa
            assert a.argmax() == b.argmax(), isa


# --------------------------------------------------------------------------------------------- generate()


def test_padded_batch_generate_matches_each_prompt_alone():
    model = _model(**SHAPES["gqa5_d64"])
    vocab = model.config.vocab_size
    short, long = torch.randint(3, vocab, (4,)), torch.randint(3, vocab, (9,))
    ids = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), long])
    mask = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(4, dtype=torch.long)]),
                        torch.ones(9, dtype=torch.long)])
    batched = _greedy(model, ids, 16, attention_mask=mask, pad_token_id=0)
    alone_short = _greedy(model, short[None], 16)
    alone_long = _greedy(model, long[None], 16)
    assert torch.equal(batched[0, 9:], alone_short[0, 4:])
    assert torch.equal(batched[1, 9:], alone_long[0, 9:])
    eager = _greedy(model, ids, 16, attention_mask=mask, pad_token_id=0, use_decode_engine=False)
    assert torch.equal(batched, eager)


def test_sampling_with_seed_and_processors_matches_eager():
    model = _model(**SHAPES["gqa1_d64"])
    prompt = torch.randint(3, model.config.vocab_size, (1, 6))
    kw = dict(max_new_tokens=24, do_sample=True, top_k=40, temperature=0.9, repetition_penalty=1.2)
    with torch.inference_mode():
        torch.manual_seed(123)
        engine = model.generate(prompt, **kw)
        torch.manual_seed(123)
        eager = model.generate(prompt, use_decode_engine=False, **kw)
    assert torch.equal(engine, eager)


def test_logits_processor_and_stopping_criteria_apply_on_the_engine():
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    model = _model(**SHAPES["gqa1_d64"])
    prompt = torch.randint(3, model.config.vocab_size, (1, 6))
    free = _greedy(model, prompt, 8)
    banned = int(free[0, 6])

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, banned] = -float("inf")
            return scores

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 6 + 5, dtype=torch.bool)

    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=20, do_sample=False, logits_processor=LogitsProcessorList([Ban()]),
                             stopping_criteria=StoppingCriteriaList([StopAfter()]))
        eager = model.generate(prompt, max_new_tokens=20, do_sample=False, use_decode_engine=False,
                               logits_processor=LogitsProcessorList([Ban()]),
                               stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == 11 and banned not in out[0, 6:].tolist()
    assert torch.equal(out, eager)


def test_hooks_and_engine_off_fall_back_to_eager(monkeypatch):
    model = _model(**SHAPES["gqa1_d64"])
    prompt = torch.randint(3, model.config.vocab_size, (1, 4))
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: seen.append(1))
    try:
        assert engine_supported(model) == (False, "a module has forward hooks")
        assert bitnet_torch.backend_info(model)["decode_path"] == "eager"
        _greedy(model, prompt, 3)
        assert seen  # the eager path ran the hooked projection
        with pytest.raises(ValueError, match="cannot use the decode engine"):
            _greedy(model, prompt, 3, use_decode_engine=True)
    finally:
        handle.remove()
    assert bitnet_torch.backend_info(model)["decode_path"] == "engine"
    monkeypatch.setenv("BITNET_TORCH_ENGINE", "0")
    assert decode_path(model)[0] == "eager"
    assert "decode_path" not in bitnet_torch.backend_info()  # the no-argument form is unchanged


def test_unsupported_models_are_refused_with_a_reason():
    trainable = BitNetForCausalLM.from_config(_config(), packed=False)
    ok, reason = engine_supported(trainable)
    assert not ok and "PackedBitLinear" in reason
    with pytest.raises(ValueError, match="cannot run this model"):
        DecodeEngine(trainable, 1, 8)
    silu = _model()
    silu.config.hidden_act = "silu"
    assert not engine_supported(silu)[0]


# --------------------------------------------------------------------------------------------- errors


def test_clear_errors():
    model = _model(**SHAPES["gqa1_d64"])
    engine = DecodeEngine(model, 2, 8)
    a = engine.allocate()
    with pytest.raises(ValueError, match="slot 1 is not allocated"):
        engine.decode([1], [3])
    b = engine.allocate()
    with pytest.raises(RuntimeError, match="max_batch_size"):
        engine.allocate()
    with pytest.raises(ValueError, match="out of range"):
        engine.prefill(a, [model.config.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        engine.decode([a], [-1])
    with pytest.raises(TypeError, match="integer token ids"):
        engine.prefill(a, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="on CPU"):
        engine.prefill(a, torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match="2 slots but 1 token"):
        engine.decode([a, b], [3])
    with pytest.raises(ValueError, match="duplicate"):
        engine.decode([a, a], [3, 4])
    with pytest.raises(ValueError, match="at least one token"):
        engine.prefill(a, [])
    engine.prefill(a, [3] * 7)
    engine.decode([a], [4])
    with pytest.raises(RuntimeError, match="cache is full"):
        engine.decode([a], [5])
    with pytest.raises(RuntimeError, match="do not fit"):
        engine.prefill(b, [3] * 9)
    assert engine.length(a) == 8 and engine.length(b) == 0  # nothing was written by the refused calls
    engine.release(a)
    with pytest.raises(ValueError, match="not allocated"):
        engine.length(a)
    with pytest.raises(ValueError, match="positive int"):
        DecodeEngine(model, 0, 8)


def _op_args(engine, tokens, positions, slots, logit_rows):
    t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    return (t(tokens), t(positions), t(slots), t(logit_rows), engine._embed, engine._embed_scale, engine._norms,
            engine._packed, engine._weight_scales, engine._cos, engine._sin, engine._head, engine._head_scale,
            engine._k_cache, engine._v_cache, engine.num_heads, engine.num_kv_heads, engine.eps, engine.attn_scale)


def test_op_refuses_bad_arguments():
    engine = DecodeEngine(_model(**SHAPES["gqa1_d64"]), 2, 8)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.bitnet.decode_step(*_op_args(engine, [3], [8], [0], [0]))
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.bitnet.decode_step(*_op_args(engine, [3], [0], [2], [0]))
    with pytest.raises(ValueError, match="same"):
        torch.ops.bitnet.decode_step(*_op_args(engine, [3, 4], [0, 0], [1, 1], [0]))
    args = list(_op_args(engine, [3], [0], [0], [0]))
    args[7] = args[7][:-1]
    with pytest.raises(ValueError, match="7 "):
        torch.ops.bitnet.decode_step(*args)


def test_opcheck():
    engine = DecodeEngine(_model(vocab=67, hidden=64, intermediate=64, layers=1, heads=2, kv_heads=1), 2, 6)
    engine._k_cache.zero_()
    engine._v_cache.zero_()
    torch.library.opcheck(torch.ops.bitnet.decode_step.default, _op_args(engine, [3, 4, 5], [0, 1, 0], [0, 0, 1], [1, 2]))


def test_reference_equals_the_compiled_op():
    """The op against its definition (the composition of the reference ops), prefill then a batched step."""
    from bitnet_torch import _reference_ops

    model = _model(**SHAPES["gqa4_d128"])
    compiled, reference = DecodeEngine(model, 2, 16), DecodeEngine(model, 2, 16)
    calls = [([3, 9, 4, 11], [0, 1, 2, 3], [0, 0, 0, 0], [3]), ([5, 6], [4, 0], [0, 1], [0, 1])]
    for tokens, positions, slots, rows in calls:
        a = torch.ops.bitnet.decode_step(*_op_args(compiled, tokens, positions, slots, rows))
        b = _reference_ops.decode_step(*_op_args(reference, tokens, positions, slots, rows))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3 * b.abs().max().item())

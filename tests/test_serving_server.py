"""`bitnet-torch serve` as a real process on 127.0.0.1, driven with the official ``openai`` client and httpx.

Two server processes on a tiny random packed model (started together, one torch thread each): ``main`` (``python
-m bitnet_torch.serving``, API key from the environment; chat and completions, streaming, stop, usage, greedy ==
``model.generate``, a 16 x 4 load test with batch invariance and metrics, bad input, auth, body size) and
``limits`` (``bitnet-torch serve``, key file; one sequence and a queue of one: queue full, disconnect
cancellation, request timeout, then SIGTERM drain). Per-key requests / tokens per minute are checked on the same
app served by uvicorn in a thread of the test process (``rate``), which saves a third model process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bitnet_torch.serving.backend import eos_token_ids, load_model  # noqa: E402
from bitnet_torch.serving.config import client_id  # noqa: E402
from test_gguf_helpers import make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow  # server processes: about a minute on a loaded 2-core machine

REPO = Path(__file__).resolve().parents[1]
MAIN_KEY = "sk-main-5f2b0c9d7e1a4c3b"
LIMITS_KEY, DRAIN_KEY = "sk-limits-a1b2c3d4", "sk-drain-e5f6a7b8"
RPM_KEY, TPM_KEY = "sk-rpm-0a0b0c0d", "sk-tpm-1a1b1c1d"
PROMPTS = ["In the beginning God", "And the earth was without form", "Let there be light", "User: What is"]
#: A request that cannot finish within the tests' timeouts (6 s request timeout, streams held open while the
#: test checks the queue): the tiny model decodes a few thousand tokens a second, so 7000 tokens finished in
#: under 6 s once the decode engine got faster. 60000 would need 10000 tokens/s (its attention alone over a
#: growing cache makes that impossible).
LONG_TOKENS = 60000
LONG_SEQ = 65536
STARTUP_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess with its log file; :meth:`wait_ready` polls ``/health``."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=env, cwd=REPO, stdout=self._log_file,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"server not ready after {STARTUP_S} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_tiny_checkpoint(root / "packed", form="packed")
    keys = root / "keys.txt"
    keys.write_text(f"# clients\n{LIMITS_KEY}\n\n{DRAIN_KEY}\n{RPM_KEY}\n{TPM_KEY}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "BITNET_TORCH_API_KEY"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    common = [str(model_dir), "--threads", "1", "--served-model-name", "tiny"]
    procs = {
        "main": ServerProcess([sys.executable, "-m", "bitnet_torch.serving", *common, "--max-batch-size", "16",
                               "--max-queue", "64", "--max-seq-len", "256", "--max-prompt-tokens", "64",
                               "--max-tokens-limit", "64", "--max-body-bytes", "20000"],
                              dict(env, BITNET_TORCH_API_KEY=MAIN_KEY), root / "main.log"),
        "limits": ServerProcess([sys.executable, "-m", "bitnet_torch", "serve", *common, "--api-key-file", str(keys),
                                 "--max-batch-size", "1", "--max-queue", "1", "--max-seq-len", str(LONG_SEQ),
                                 "--max-tokens-limit", str(LONG_TOKENS), "--request-timeout", "6", "--drain-timeout", "20"],
                                env, root / "limits.log"),
    }
    try:
        deadline = time.monotonic() + STARTUP_S
        for proc in procs.values():
            proc.wait_ready(deadline)
        yield {"model_dir": model_dir, **procs}
    finally:
        for proc in procs.values():
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)  # all at once: each drains in parallel
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def reference(servers):
    """The served model loaded here, for ``generate`` references."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_model(servers["model_dir"])
    yield model, tokenizer, eos_token_ids(model, tokenizer)
    torch.set_num_threads(threads)


class ThreadServer:
    """The app served by uvicorn in a thread of this process (real HTTP on 127.0.0.1, no second model load)."""

    def __init__(self, model, tokenizer, config):
        from bitnet_torch.serving.app import create_app
        from bitnet_torch.serving.server import DrainingServer, build_state, uvicorn_config

        self.port = config.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = build_state(model, tokenizer, config)
        self.server = DrainingServer(uvicorn_config(create_app(self.state), config), self.state)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started, "the in-process server did not start"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def rate(reference):
    """A server with per-key limits of 3 requests and 200 tokens per minute."""
    from bitnet_torch.serving.config import ServeConfig

    model, tokenizer, _ = reference
    config = ServeConfig(model_name="tiny", max_seq_len=1024, rate_limit_rpm=3, rate_limit_tpm=200,
                         api_keys=(RPM_KEY, TPM_KEY))
    server = ThreadServer(model, tokenizer, config)
    yield server
    server.stop()


def _client(server, key=MAIN_KEY):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _post(server, path, body=None, key=MAIN_KEY, raw: bytes | None = None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=timeout)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def _metrics(server) -> dict:
    """``{(sample name, frozenset(labels)): value}`` from ``/metrics``, parsed by prometheus_client."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
            out[(sample.name, frozenset(labels.items()))] = sample.value
    return out


def _total(metrics: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


def _generate_text(reference, ids, max_new_tokens):
    model, tokenizer, eos = reference
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[0])
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new), ("stop" if new[-1] in eos else "length")


def _chat_ids(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ main server


def test_models_health_and_api_keys(servers):
    main = servers["main"]
    assert _client(main).models.list().data[0].id == "tiny"
    assert httpx.get(main.url + "/health").json() == {"status": "ok"}
    assert httpx.get(main.url + "/ready").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(main, key="sk-wrong").models.list()
    for key in (None, "sk-wrong", MAIN_KEY + "x"):
        r = _post(main, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=key)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(main.url + "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": MAIN_KEY})
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    r = _post(main, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    log = main.log_text()
    assert MAIN_KEY not in log and client_id(MAIN_KEY) in log
    lines = [json.loads(line.split(": ", 1)[1]) for line in log.splitlines() if "serving.requests:" in line]
    assert any(rec["event"] == "request" and rec["client"] == client_id(MAIN_KEY) and rec["completion_tokens"] == 2
               and rec["status"] == 200 and rec["finish_reason"] in ("length", "stop") and rec["ttft_s"] is not None
               for rec in lines)
    assert any(rec["event"] == "refused" and rec["status"] == 401 and rec["reason"] == "unauthorized"
               for rec in lines)


def test_chat_greedy_text_equals_generate_streaming_or_not(servers, reference):
    main = servers["main"]
    client = _client(main)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Let there be light"}]
    ids = _chat_ids(reference[1], messages)
    want, n_new, reason = _generate_text(reference, ids, 20)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n_new, len(ids) + n_new)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_new
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_completion_greedy_text_equals_generate_streaming_or_not(servers, reference):
    main = servers["main"]
    client = _client(main)
    prompt = PROMPTS[1]
    ids = reference[1](prompt)["input_ids"]
    want, n_new, reason = _generate_text(reference, ids, 24)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == want and r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n_new)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == want
    pieces = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want
    assert pieces[-1].choices[0].finish_reason == reason
    raw = httpx.post(main.url + "/v1/completions", headers={"Authorization": f"Bearer {MAIN_KEY}"},
                     json={"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}).text
    events = [line for line in raw.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_sequences_cut_the_text(servers):
    client = _client(servers["main"])
    full = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = full.choices[0].text
    start = next(i for i in range(1, len(text) - 1) if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip())
    stop = text[start:start + 2]
    for stream in (False, True):
        kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop, "zzzz"],
                  extra_body={"ignore_eos": True})
        if stream:
            pieces = list(client.completions.create(stream=True, **kw))
            got, reason = "".join(p.choices[0].text for p in pieces), pieces[-1].choices[0].finish_reason
        else:
            r = client.completions.create(**kw)
            got, reason = r.choices[0].text, r.choices[0].finish_reason
        assert got == text[: text.find(stop)] and reason == "stop"


def _one_request(client, kind: str, prompt: str) -> tuple[str, str, int, str]:
    """(response id, text, completion tokens, finish reason) of one greedy request of ``kind``."""
    chat, stream = kind.startswith("chat"), kind.endswith("stream")
    kw = dict(model="tiny", max_tokens=24, temperature=0)
    if chat:
        kw["messages"] = [{"role": "user", "content": prompt}]
        call = client.chat.completions.create
    else:
        kw["prompt"] = prompt
        call = client.completions.create
    if not stream:
        r = call(**kw)
        text = r.choices[0].message.content if chat else r.choices[0].text
        return r.id, text, r.usage.completion_tokens, r.choices[0].finish_reason
    chunks = list(call(stream=True, stream_options={"include_usage": True}, **kw))
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    text = "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices)
    reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return ids.pop(), text, chunks[-1].usage.completion_tokens, reason


def test_load_16_clients_every_request_answered_once_and_batch_invariant(servers):
    main = servers["main"]
    kinds = ("chat", "chat-stream", "completion", "completion-stream")
    solo = {}
    client = _client(main)
    for prompt in PROMPTS:
        for kind in ("chat", "completion"):
            solo[kind, prompt] = _one_request(client, kind, prompt)[1:]
    before = _metrics(main)
    results: dict[int, list] = {i: [] for i in range(16)}
    errors: list[BaseException] = []
    running_seen: list[float] = []
    done = threading.Event()

    def worker(i: int) -> None:
        c = _client(main)
        try:
            for j in range(4):
                kind, prompt = kinds[(i + j) % 4], PROMPTS[(i + 2 * j) % 4]
                results[i].append((kind, prompt, _one_request(c, kind, prompt)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def watch() -> None:
        while not done.is_set():
            running_seen.append(_total(_metrics(main), "bitnet_num_requests_running"))
            time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    watcher = threading.Thread(target=watch)
    started = time.monotonic()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, 150 - (time.monotonic() - started)))
    done.set()
    watcher.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "load test did not finish in time"
    assert not errors, errors[0]
    answered = [r for rs in results.values() for r in rs]
    assert len(answered) == 64 and all(len(rs) == 4 for rs in results.values())
    assert len({r[2][0] for r in answered}) == 64  # distinct response ids: none duplicated
    for kind, prompt, (_, text, n, reason) in answered:
        assert (text, n, reason) == solo[kind.split("-")[0], prompt], (kind, prompt)
    assert max(running_seen) > 1  # requests really were batched together
    after = _metrics(main)
    assert _total(after, "bitnet_request_success_total") - _total(before, "bitnet_request_success_total") == 64
    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        sent = sum(1 for kind, _, _ in answered if kind.startswith(endpoint.split("/")[-1][:4]))
        got = (_total(after, "bitnet_http_requests_total", endpoint=endpoint, status="200")
               - _total(before, "bitnet_http_requests_total", endpoint=endpoint, status="200"))
        assert got == sent == 32
    generated = sum(r[2][2] for r in answered)
    assert _total(after, "bitnet_generation_tokens_total") - _total(before, "bitnet_generation_tokens_total") == generated
    assert (_total(after, "bitnet_time_to_first_token_seconds_count")
            - _total(before, "bitnet_time_to_first_token_seconds_count")) == 64
    assert _total(after, "bitnet_num_requests_running") == 0 and _total(after, "bitnet_num_requests_waiting") == 0


BAD_INPUTS = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", {"messages": "hi"}, 422, "messages"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 422, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ x }}"}, 400,
     "chat template comes from the model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400,
     "limit of max_tokens=64"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("/v1/completions", {"prompt": "light " * 200}, 400, "maximum of 64 prompt tokens"),
    ("/v1/completions", {"prompt": [10 ** 6]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 422, "stream"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": 42}, 422, "prompt"),
    ("/v1/completions", {}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400, "at most 16 stop"),
    ("/v1/completions", b"[" * 9_000 + b"]" * 9_000, 400, "too deeply"),
]


@pytest.mark.parametrize("path,body,status,message", BAD_INPUTS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_gets_its_status_and_an_openai_error_body(servers, path, body, status, message):
    main = servers["main"]
    r = _post(main, path, raw=body) if isinstance(body, bytes) else _post(main, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_body_too_large_is_413_and_the_server_keeps_serving(servers):
    main = servers["main"]
    r = _post(main, "/v1/completions", {"prompt": "x" * 30_000})
    assert r.status_code == 413 and "20000 bytes" in r.json()["error"]["message"]
    chunked = httpx.post(main.url + "/v1/completions", headers={"Authorization": f"Bearer {MAIN_KEY}"},
                         content=iter([b'{"prompt": "', b"y" * 25_000, b'"}']))  # no Content-Length
    assert chunked.status_code == 413
    r = _client(main).completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    metrics = _metrics(main)
    assert _total(metrics, "bitnet_request_rejected_total", reason="body_too_large") == 2
    assert _total(metrics, "bitnet_request_rejected_total", reason="unauthorized") >= 3
    assert _total(metrics, "bitnet_http_requests_total", status="500") == 0
    assert httpx.get(main.url + "/health").status_code == 200


def test_metrics_follow_vllm_names_and_parse(servers):
    text = httpx.get(servers["main"].url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [("bitnet_num_requests_running", "gauge"), ("bitnet_num_requests_waiting", "gauge"),
                       ("bitnet_prompt_tokens", "counter"), ("bitnet_generation_tokens", "counter"),
                       ("bitnet_time_to_first_token_seconds", "histogram"),
                       ("bitnet_inter_token_latency_seconds", "histogram"),
                       ("bitnet_e2e_request_latency_seconds", "histogram"),
                       ("bitnet_request_queue_time_seconds", "histogram"), ("bitnet_request_success", "counter"),
                       ("bitnet_request_rejected", "counter")]:
        assert families[name].type == kind, name
        assert all(s.labels.get("model_name") == "tiny" for s in families[name].samples)


# --------------------------------------------------------------------------------------------- rate limits


def test_per_key_requests_per_minute(rate):
    for _ in range(3):
        assert _post(rate, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=RPM_KEY).status_code == 200
    r = _post(rate, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=RPM_KEY)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error" and "3 requests per minute" in r.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        _client(rate, RPM_KEY).completions.create(model="tiny", prompt="hi", max_tokens=1)
    # another key has its own budget
    assert _post(rate, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=TPM_KEY).status_code == 200


def test_per_key_tokens_per_minute(rate):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    r = _post(rate, "/v1/completions", body, key=TPM_KEY)  # 1 + 154 of the 200 tokens per minute spent by now
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 150
    r = _post(rate, "/v1/completions", body, key=TPM_KEY)
    assert r.status_code == 429 and "200 tokens per minute" in r.json()["error"]["message"]
    assert 20 <= int(r.headers["Retry-After"]) <= 60
    r = _post(rate, "/v1/completions", dict(body, max_tokens=250), key=TPM_KEY)
    assert r.status_code == 429 and "needs 254 tokens" in r.json()["error"]["message"]
    metrics = _metrics(rate)
    assert _total(metrics, "bitnet_request_rejected_total", reason="rate_limit_tokens") == 2


# --------------------------------------------------------------------------------- queue, disconnect, timeout


def _open_stream(client: httpx.Client, server, key, max_tokens=LONG_TOKENS):
    body = {"prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    request = client.build_request("POST", server.url + "/v1/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"})
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    return response, lines


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_queue_full_is_429_and_disconnect_cancels_the_sequence(servers):
    limits = servers["limits"]
    before = _metrics(limits)
    with httpx.Client(timeout=30) as first_client, httpx.Client(timeout=30) as second_client:
        first, first_lines = _open_stream(first_client, limits, LIMITS_KEY)
        assert next(line for line in first_lines if line.startswith("data: "))
        second, _ = _open_stream(second_client, limits, LIMITS_KEY)  # waits for the one sequence slot
        assert _wait_for(lambda: _total(_metrics(limits), "bitnet_num_requests_waiting") == 1)
        r = _post(limits, "/v1/completions", {"prompt": "hi", "max_tokens": 1}, key=LIMITS_KEY)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["Retry-After"]) >= 1
        first.close()
        second.close()
    assert _wait_for(lambda: _total(_metrics(limits), "bitnet_request_success_total", finished_reason="abort")
                     - _total(before, "bitnet_request_success_total", finished_reason="abort") == 2)
    after = _metrics(limits)
    assert _total(after, "bitnet_num_requests_running") == 0 and _total(after, "bitnet_num_requests_waiting") == 0
    assert _total(after, "bitnet_request_rejected_total", reason="queue_full") == 1
    assert _total(after, "bitnet_request_success_total", finished_reason="length") == _total(
        before, "bitnet_request_success_total", finished_reason="length")


def test_a_non_streaming_client_that_disconnects_cancels_its_sequence(servers):
    limits = servers["limits"]
    before = _metrics(limits)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and closes the connection
        _post(limits, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": LONG_TOKENS, "temperature": 0,
                                          "ignore_eos": True}, key=LIMITS_KEY, timeout=1.0)
    assert _wait_for(lambda: _total(_metrics(limits), "bitnet_request_success_total", finished_reason="abort")
                     - _total(before, "bitnet_request_success_total", finished_reason="abort") == 1, timeout=3.0)
    after = _metrics(limits)
    assert _total(after, "bitnet_num_requests_running") == 0
    assert _total(after, "bitnet_request_success_total", finished_reason="timeout") == _total(
        before, "bitnet_request_success_total", finished_reason="timeout")


def test_request_timeout_is_408_and_frees_the_slot(servers):
    limits = servers["limits"]
    started = time.monotonic()
    r = _post(limits, "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": LONG_TOKENS, "temperature": 0,
                                          "ignore_eos": True}, key=LIMITS_KEY)
    assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
    assert 5.5 < time.monotonic() - started < 40
    assert _wait_for(lambda: _total(_metrics(limits), "bitnet_num_requests_running") == 0)
    assert _total(_metrics(limits), "bitnet_request_success_total", finished_reason="timeout") == 1


def test_sigterm_drains_in_flight_requests_and_exits_0(servers):
    """Last test of the module: the limits server stops for good."""
    limits = servers["limits"]
    with httpx.Client(timeout=60) as client:
        response, lines = _open_stream(client, limits, DRAIN_KEY, max_tokens=200)
        events = [next(line for line in lines if line.startswith("data: "))]
        limits.proc.send_signal(signal.SIGTERM)
        events += [line for line in lines if line.startswith("data: ")]
        response.close()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, not cut
    assert limits.proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(limits.url + "/health", timeout=5)
    log = limits.log_text()
    assert "draining" in log and "drained and stopped" in log
    assert LIMITS_KEY not in log and DRAIN_KEY not in log


def test_drain_deadline_cancels_what_is_still_running(reference):
    """After ``drain_timeout_s`` the in-flight request is cut and its sequence leaves the batch (in-process server:
    ``handle_exit`` is what uvicorn calls on SIGTERM)."""
    from bitnet_torch.serving.config import ServeConfig

    model, tokenizer, _ = reference
    config = ServeConfig(model_name="tiny", max_seq_len=LONG_SEQ, max_tokens_limit=LONG_TOKENS, drain_timeout_s=1.0)
    server = ThreadServer(model, tokenizer, config)
    try:
        with httpx.Client(timeout=30) as client:
            response, lines = _open_stream(client, server, key=None)
            assert next(line for line in lines if line.startswith("data: "))
            started = time.monotonic()
            server.server.handle_exit(signal.SIGTERM, None)
            with pytest.raises(httpx.ConnectError):  # the listening socket is closed at once
                _wait_for(lambda: httpx.get(server.url + "/health", timeout=1) is None, timeout=5)
            tail = []
            with pytest.raises(httpx.HTTPError):  # cut at the deadline: no [DONE]
                tail = [line for line in lines if line.startswith("data: ")]
                raise AssertionError(f"the stream ended normally: {tail[-1:]}")
            response.close()
        server.thread.join(timeout=30)
        assert not server.thread.is_alive() and 0.9 < time.monotonic() - started < 25
        scheduler = server.state.scheduler
        assert scheduler.num_running == 0 and not scheduler.alive
        abort = [s.value for s in server.state.metrics._success.collect()[0].samples
                 if s.name.endswith("_total") and s.labels["finished_reason"] == "abort"]
        assert abort == [1.0]
    finally:
        server.stop()

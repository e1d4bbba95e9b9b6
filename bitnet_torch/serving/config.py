"""The server's settings in one dataclass (limits, security, scheduling), read by the app and the scheduler."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

__all__ = ["ServeConfig", "API_KEY_ENV", "load_api_keys", "client_id", "add_serve_arguments", "config_from_args"]

#: Environment variable holding API keys (comma-separated) when ``--api-key-file`` is not given.
API_KEY_ENV = "BITNET_TORCH_API_KEY"


@dataclasses.dataclass
class ServeConfig:
    """What the server accepts and how it schedules; every limit is enforced with an OpenAI-style error."""

    model_name: str = "bitnet"
    host: str = "127.0.0.1"
    port: int = 8000
    #: sequences decoded together (slots of the decoder); more wait in the queue
    max_batch_size: int = 16
    #: requests waiting for a slot; beyond it: 429 with Retry-After
    max_queue: int = 64
    #: KV-cache positions per sequence (prompt + generated tokens)
    max_seq_len: int = 2048
    #: the longest prompt accepted (tokens); 0 = max_seq_len - 1
    max_prompt_tokens: int = 0
    #: the largest max_tokens a request may ask for
    max_tokens_limit: int = 1024
    #: max_tokens when a request gives none
    default_max_tokens: int = 256
    #: prompt tokens prefilled per scheduler step (fixed chunk boundaries per sequence)
    prefill_chunk: int = 256
    #: request body limit in bytes (413 above it)
    max_body_bytes: int = 1 << 20
    #: seconds from arrival to the last token before a request is cancelled (0 = none)
    request_timeout_s: float = 600.0
    #: per-API-key requests per minute (0 = unlimited)
    rate_limit_rpm: float = 0.0
    #: per-API-key tokens (prompt + max_tokens) per minute (0 = unlimited)
    rate_limit_tpm: float = 0.0
    #: seconds SIGTERM waits for in-flight requests before cancelling them
    drain_timeout_s: float = 30.0
    #: accepted API keys; empty = no authentication
    api_keys: tuple[str, ...] = ()
    #: CORS origins (none unless asked)
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "max_tokens_limit", "default_max_tokens", "prefill_chunk",
                     "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_queue", "max_prompt_tokens", "request_timeout_s", "rate_limit_rpm", "rate_limit_tpm",
                     "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.max_prompt_tokens == 0 or self.max_prompt_tokens >= self.max_seq_len:
            self.max_prompt_tokens = self.max_seq_len - 1
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit


def load_api_keys(path: str | Path | None = None, env: str = API_KEY_ENV) -> tuple[str, ...]:
    """API keys from ``path`` (one per line; blank lines and ``#`` comments skipped) or, without a path, from the
    environment variable ``env`` (comma-separated). Refuses (``ValueError``) a key file that holds no key."""
    if path is not None:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
        if not keys:
            raise ValueError(f"the API key file {path} holds no key")
        return keys
    return tuple(k.strip() for k in os.environ.get(env, "").split(",") if k.strip())


def client_id(api_key: str | None) -> str:
    """A short, non-reversible name for the client holding ``api_key`` (logs and rate limits never see the key)."""
    if not api_key:
        return "anonymous"
    return "key-" + hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:10]


def add_serve_arguments(parser) -> None:
    """The ``serve`` options on an ``argparse`` parser (shared by ``bitnet-torch serve`` and
    ``python -m bitnet_torch.serving``)."""
    d = ServeConfig()
    parser.add_argument("model", help="checkpoint directory (packed or master) or a .gguf file (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--host", default=d.host, help="address to bind (default: %(default)s, loopback only)")
    parser.add_argument("--port", type=int, default=d.port, help="port (default: %(default)s)")
    parser.add_argument("--served-model-name", default=None, help="model name in responses (default: the directory name)")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                        help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting for a sequence slot before 429 (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="KV-cache positions per sequence (default: the model's max_position_embeddings, at most 4096)")
    parser.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt accepted (default: max-seq-len - 1)")
    parser.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                        help="largest max_tokens a request may ask for (default: %(default)s)")
    parser.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                        help="max_tokens when a request gives none (default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk,
                        help="prompt tokens prefilled per scheduler step (default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                        help="largest request body (default: %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                        help="seconds before a request is cancelled, 0 = never (default: %(default)s)")
    parser.add_argument("--rate-limit-rpm", type=float, default=0.0, help="requests per minute per API key (0 = off)")
    parser.add_argument("--rate-limit-tpm", type=float, default=0.0,
                        help="tokens (prompt + max_tokens) per minute per API key (0 = off)")
    parser.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s,
                        help="on SIGTERM, seconds to finish in-flight requests before cancelling them (default: %(default)s)")
    parser.add_argument("--api-key-file", default=None,
                        help=f"file with accepted API keys, one per line (default: ${API_KEY_ENV}, comma-separated; "
                             "neither = no authentication)")
    parser.add_argument("--cors-origin", action="append", default=[], help="allow CORS from this origin (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    parser.add_argument("--no-request-log", action="store_true", help="do not log one line per request")


def config_from_args(args, model_name: str, model_max_positions: int | None) -> ServeConfig:
    """A :class:`ServeConfig` from parsed :func:`add_serve_arguments` options (keys read from file or env)."""
    max_seq_len = args.max_seq_len or min(int(model_max_positions or 2048), 4096)
    return ServeConfig(
        model_name=args.served_model_name or model_name, host=args.host, port=args.port,
        max_batch_size=args.max_batch_size, max_queue=args.max_queue, max_seq_len=max_seq_len,
        max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, prefill_chunk=args.prefill_chunk,
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
        rate_limit_rpm=args.rate_limit_rpm, rate_limit_tpm=args.rate_limit_tpm, drain_timeout_s=args.drain_timeout,
        api_keys=load_api_keys(args.api_key_file), cors_origins=tuple(args.cors_origin),
    )

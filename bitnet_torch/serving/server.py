"""Running the server: load the model, build the scheduler and the app, serve with uvicorn, drain on SIGTERM.

On SIGTERM (or Ctrl+C) the server stops accepting connections, answers 503 to new requests on open ones, lets
in-flight requests finish for up to ``drain_timeout_s``, cancels what is left, stops the scheduler and returns 0.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import uvicorn

from .app import ServerState, create_app
from .backend import eos_token_ids, load_model, make_decoder
from .config import API_KEY_ENV, ServeConfig, client_id
from .metrics import ServingMetrics
from .scheduler import Scheduler

__all__ = ["DrainingServer", "build_state", "serve", "run_from_args", "uvicorn_config"]

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app as draining the moment a signal arrives (new requests: 503).

    uvicorn then closes the listening socket, waits up to ``timeout_graceful_shutdown`` for in-flight responses,
    cancels the rest (their sequences leave the batch) and runs the app's shutdown (the scheduler stops).
    """

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        state = self.state
        if not state.draining:
            logger.warning("signal %d: draining (%d running, %d waiting; up to %.0f s)", sig,
                           state.scheduler.num_running, state.scheduler.num_waiting, state.config.drain_timeout_s)
        state.draining = True
        super().handle_exit(sig, frame)


def uvicorn_config(app, config: ServeConfig) -> uvicorn.Config:
    """uvicorn settings for ``app``: host/port from ``config``, the drain deadline, no access log."""
    return uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                          timeout_graceful_shutdown=max(1, int(round(config.drain_timeout_s))), lifespan="on")


def build_state(model: Any, tokenizer: Any, config: ServeConfig) -> ServerState:
    """Decoder, scheduler, metrics and settings for serving ``model`` (the app is ``create_app(state)``)."""
    metrics = ServingMetrics(config.model_name)
    decoder = make_decoder(model, config.max_batch_size, config.max_seq_len)

    def decode_text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    scheduler = Scheduler(decoder, decode_text, eos_token_ids(model, tokenizer), max_queue=config.max_queue,
                          prefill_chunk=config.prefill_chunk, metrics=metrics)
    return ServerState(config=config, tokenizer=tokenizer, scheduler=scheduler, metrics=metrics)


def serve(model_path: str | Path, config: ServeConfig, tokenizer_path: str | Path | None = None,
          model: Any = None, tokenizer: Any = None) -> int:
    """Load the model (unless given) and serve it until SIGTERM/SIGINT; returns the exit code (0 after a drain)."""
    if model is None:
        model, tokenizer = load_model(model_path, tokenizer_path)
    state = build_state(model, tokenizer, config)
    app = create_app(state)
    if config.api_keys:
        logger.info("API keys required: %s", ", ".join(client_id(k) for k in config.api_keys))
    else:
        logger.warning("no API keys configured: every client is accepted")
        if config.host not in ("127.0.0.1", "localhost", "::1"):
            logger.warning("binding %s without API keys: anyone who can reach this address can use the model "
                           "(give --api-key-file or $%s)", config.host, API_KEY_ENV)
    uv_config = uvicorn_config(app, config)

    server = DrainingServer(uv_config, state)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place that is a no-op,
    # so a drained server returns 0 instead of dying of the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"serving {config.model_name} on http://{config.host}:{config.port}/v1", flush=True)
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        logger.error("the server did not start (is port %d free?)", config.port)
        return 1
    logger.warning("drained and stopped")
    return 0


def run_from_args(args) -> int:
    """``serve`` from parsed :func:`~bitnet_torch.serving.config.add_serve_arguments` options: threads, request
    log, model loading, then :func:`serve`."""
    from .config import config_from_args

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    serving_logger = logging.getLogger("bitnet_torch.serving")
    if serving_logger.getEffectiveLevel() > logging.INFO:
        serving_logger.setLevel(logging.INFO)
    if args.no_request_log:
        logging.getLogger("bitnet_torch.serving.requests").setLevel(logging.WARNING)
    model, tokenizer = load_model(args.model, args.tokenizer)
    name = Path(args.model).stem if Path(args.model).is_file() else Path(args.model).resolve().name
    config = config_from_args(args, name, getattr(model.config, "max_position_embeddings", None))
    return serve(args.model, config, model=model, tokenizer=tokenizer)

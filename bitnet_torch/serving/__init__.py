"""OpenAI-compatible HTTP server for BitNet models: continuous batching, limits, API keys, Prometheus metrics.

``bitnet-torch serve MODEL`` or ``python -m bitnet_torch.serving MODEL``. Modules: :mod:`.protocol` (OpenAI
schemas), :mod:`.app` (routes, auth, limits, SSE), :mod:`.scheduler` (continuous batching, no HTTP),
:mod:`.backend` (the decoder it drives), :mod:`.metrics`, :mod:`.limits`, :mod:`.config`, :mod:`.server`.
Needs the ``serve`` extra (``pip install 'bitnet_torch[serve]'``).
"""

from __future__ import annotations

__all__ = ["ServeConfig", "Scheduler", "SamplingParams", "ModelDecoder", "make_decoder", "serve"]


def __getattr__(name: str):
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    if name in ("Scheduler", "SamplingParams"):
        from . import scheduler

        return getattr(scheduler, name)
    if name in ("ModelDecoder", "make_decoder"):
        from . import backend

        return getattr(backend, name)
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(f"module 'bitnet_torch.serving' has no attribute {name!r}")

"""bitnet_torch: BitNet b1.58 (ternary weights, int8 activations) language models for PyTorch.

The public API at the top level:

* the executable spec: :func:`quantize_weight`, :func:`quantize_activation`, :func:`pack_ternary`,
  :func:`unpack_ternary` (docs/SPEC.md §1, §3);
* layers: :class:`BitLinear` (quantization-aware training), :class:`PackedBitLinear` (inference),
  :func:`convert_to_bitnet`, :func:`pack_model`;
* models: :class:`BitNetConfig`, :class:`BitNetModel`, :class:`BitNetForCausalLM` (Transformers-compatible;
  importing ``bitnet_torch`` registers them with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` for
  ``model_type: "bitnet"``, see :mod:`bitnet_torch.models`);
* :func:`backend_info`: which kernels back ``torch.ops.bitnet``.

``import bitnet_torch`` imports all of this (torch, Transformers, the kernels) at once. The one exception is
the ``bitnet-torch`` command itself (the console script or ``python -m bitnet_torch``): there the package
defers these imports until the command line has been parsed, so that ``--help`` and argument errors answer
in a fraction of a second without loading torch; the first use of any name above (or
:func:`_import_api`, which the command line calls before running a command) completes the import.
"""

from __future__ import annotations

import os as _os
import re as _re
import sys as _sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names _import_api() binds, for type checkers and IDEs
    from . import ops
    from ._backend import backend_info
    from .models import BitNetConfig, BitNetForCausalLM, BitNetModel, compiled_decode_kwargs
    from .nn import BitLinear, PackedBitLinear, RMSNorm, convert_to_bitnet, pack_model, set_lambda
    from .packing import pack_ternary, unpack_ternary
    from .quant import lambda_schedule, quantize_activation, quantize_weight

__version__ = "0.1.0"

__all__ = [
    "BitLinear",
    "BitNetConfig",
    "BitNetForCausalLM",
    "BitNetModel",
    "PackedBitLinear",
    "RMSNorm",
    "backend_info",
    "compiled_decode_kwargs",
    "convert_to_bitnet",
    "lambda_schedule",
    "ops",
    "pack_model",
    "pack_ternary",
    "quantize_activation",
    "quantize_weight",
    "set_lambda",
    "unpack_ternary",
]

_CONSOLE_SCRIPT = _re.compile(r"bitnet-torch(-script\.pyw?|\.exe)?")


def _started_as_command_line() -> bool:
    """True when this process is the ``bitnet-torch`` command: ``python -m bitnet_torch`` or the console script.

    ``sys.orig_argv`` is the interpreter's own command line (``python [options] -m bitnet_torch ...``);
    ``sys.argv[0]`` is the console script's path while it imports its entry point.
    """
    argv = iter(list(getattr(_sys, "orig_argv", []))[1:])
    for arg in argv:
        if arg == "-m":
            return next(argv, None) == "bitnet_torch"
        if arg.startswith("-m"):
            return arg[2:] == "bitnet_torch"
        if arg in ("-X", "-W"):
            next(argv, None)  # the option's value
        elif arg in ("-c", "-") or arg.startswith("-c") or not arg.startswith("-"):
            break  # -c code, stdin or a script: not started with -m
    return _CONSOLE_SCRIPT.fullmatch(_os.path.basename(_sys.argv[0] if _sys.argv else "")) is not None


def _import_api() -> None:
    """Import the public API into this module (and with it register the Auto classes); idempotent."""
    from . import ops
    from ._backend import backend_info
    from .models import BitNetConfig, BitNetForCausalLM, BitNetModel, compiled_decode_kwargs  # registers the Auto classes
    from .nn import BitLinear, PackedBitLinear, RMSNorm, convert_to_bitnet, pack_model, set_lambda
    from .packing import pack_ternary, unpack_ternary
    from .quant import lambda_schedule, quantize_activation, quantize_weight

    globals().update({name: value for name, value in locals().items() if name in __all__})


_importing = False


def __getattr__(name: str):
    """Deferred import of the public API (only reached in the command line's process; see the module docstring).

    ``ops`` is a submodule, which the import system finds by itself; a name asked for while the API is
    being imported (a circular import) is an ``AttributeError``, as it would be in an eager import.
    """
    global _importing
    if name in __all__ and name != "ops" and not _importing:
        _importing = True
        try:
            _import_api()
        finally:
            _importing = False
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if not _started_as_command_line():
    _import_api()

"""``bitnet-torch info``: backend, CPU ISA, CUDA, versions, where the compiled extension lives."""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any

from ._common import _package_versions


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import _build, backend_info

    info: dict[str, Any] = {"backend": backend_info()}
    library = _build.loaded_library_path()
    sources = _build.source_dir()
    info["extension"] = {
        "loaded_library": str(library) if library else None,
        "sources": str(sources) if sources else None,
    }
    info["cuda"] = {
        "available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    info["cpu"] = {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    info["versions"] = _package_versions()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for section, values in info.items():
        print(f"{section}:")
        for key, value in values.items():
            print(f"  {key:<22} {value}")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``info`` subcommand to ``sub``."""
    p = sub.add_parser("info", parents=[common], help="backend, ISA, CUDA, versions, extension location",
                       description="Print which kernels back torch.ops.bitnet and the environment.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=run)

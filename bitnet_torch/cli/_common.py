"""Shared pieces of the ``bitnet-torch`` subcommands: the one-line user error, path and JSON checks, thread
setting, and options generated from the training config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
from pathlib import Path
from typing import Callable

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def _require_path(path: str | Path, what: str, kind: str = "any") -> Path:
    """Return ``path`` as a Path or raise :class:`CLIError` naming what is missing."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} not found: {p}")
    if kind == "dir" and not p.is_dir():
        raise CLIError(f"{what} must be a directory: {p}")
    if kind == "file" and not p.is_file():
        raise CLIError(f"{what} must be a file: {p}")
    return p


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON: {exc}") from exc


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("bitnet_torch", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "safetensors",
                 "tokenizers", "gguf", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    """One ``--option`` per documented field of a config dataclass, defaults taken from the dataclass."""
    for f in dataclasses.fields(cls):
        if f.name not in helps:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind in ("bool", "bool | None"):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=helps[f.name])
        elif kind.startswith("Literal["):
            parser.add_argument(flag, dest=f.name, choices=re.findall(r"[\"']([^\"']+)[\"']", kind), default=default,
                                help=f"{helps[f.name]} (default: %(default)s)")
        elif f.name == "data":
            parser.add_argument(flag, dest=f.name, nargs="+", default=default, help=helps[f.name])
        else:
            convert: Callable = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, dest=f.name, type=convert, default=default,
                                help=f"{helps[f.name]} (default: %(default)s)")


def _add_training_options(parser: argparse.ArgumentParser, config_name: str, helps: dict[str, str],
                          handler: Callable[[argparse.Namespace], int]) -> None:
    """Options from the fields of ``bitnet_torch.training.config.<config_name>``: a module without torch, so
    ``train --help`` and argument errors stay light (the handler imports the training stack when it runs)."""
    from ..training import config  # noqa: PLC0415

    _add_dataclass_options(parser, getattr(config, config_name), helps)
    parser.set_defaults(handler=handler)

"""Turn benchmark JSON files into one report: ``report.md`` (tables + machine info) and ``report.png`` (plot).

Usage: python benchmarks/report.py --out DIR RESULT.json [RESULT.json ...]
(``bitnet-torch bench --out DIR`` runs the benchmarks with ``--json`` and then this script.)

What a result file may hold (everything optional except one list of row objects):

* ``"benchmark"`` / ``"name"``: title of its section (default: the file name);
* ``"machine"`` / ``"config"`` / ``"threads"``: shown above its table;
* the rows: every list of objects anywhere in the file becomes a table (nested objects are flattened:
  ``{"ms": {"ours": 1.0}}`` gives the column ``ms.ours``); string-valued fields label a row in the plot;
  other top-level values are listed above the tables.

The plot has, per table, a panel of same-run ratios (fields named ``*ratio*``, ``*speedup*``, ``*_vs_*``,
``*fraction_of*``; a dashed line marks 1.0: the baseline, or the bandwidth limit) and a panel of rates
(``*tokens_per_s*``, ``*tok_s*``).
Rows lacking a field leave a gap.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

PLOT_KEYS = ("ratio", "speedup", "x_vs", "_vs_", "fraction_of", "tokens_per_s", "tok_s", "tokens/s")


def describe_speedup(speedup: float) -> str:
    """A same-run time ratio (baseline time / our time) in words: ``"3.20x faster"``, ``"17x slower"``.

    Below 1 the reciprocal is given as "slower" (0.06 is "17x slower", never "0.06x faster").
    """
    if not speedup > 0 or speedup != speedup or speedup == float("inf"):
        return f"{speedup}x (not a valid speed ratio)"
    if 0.995 <= speedup <= 1.005:
        return "as fast (1.00x)"
    if speedup > 1:
        return f"{speedup:.2f}x faster"
    slower = 1 / speedup
    return f"{slower:.2f}x slower" if slower < 10 else f"{slower:.0f}x slower"


def speedup_sentences(rows: list[dict]) -> list[str]:
    """One sentence per ``*speedup*`` field of the rows (e.g. ``ours_decode_speedup.ours``), in words."""
    lines = []
    for row in rows:
        for key, value in row.items():
            if "speedup" in key.lower() and isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"{label(row)}: `{key}` {describe_speedup(float(value))}")
    return lines


def flatten(row: dict, prefix: str = "") -> dict:
    """``{"ms": {"ours": 1}}`` -> ``{"ms.ours": 1}``; lists become their JSON text."""
    flat: dict = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


#: Top-level keys shown as facts above the tables, never as tables.
HEADER_KEYS = ("meta", "machine", "config", "description", "threads", "benchmark", "name")


def _has_table(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(r, dict) for r in value)
    return isinstance(value, dict) and any(_has_table(v) for v in value.values())


def find_tables(data: Any, name: str = "") -> list[tuple[str, list[dict]]]:
    """Every table in a result file as ``(path, flattened rows)``.

    A list of objects is a table; below the top level, an object's leftover scalars form a one-row table;
    at the top level, an object without lists (e.g. one measurement) is a one-row table unless its key is
    one of :data:`HEADER_KEYS`.
    """
    if isinstance(data, list) and _has_table(data):
        return [(name or "results", [flatten(r) for r in data])]
    if not isinstance(data, dict):
        return []
    tables: list[tuple[str, list[dict]]] = []
    rest: dict = {}
    for key, value in data.items():
        path = f"{name}.{key}" if name else key
        if _has_table(value):
            tables += find_tables(value, path)
        elif isinstance(value, dict) and not name and key not in HEADER_KEYS:
            tables.append((path, [flatten(value)]))
        else:
            rest[key] = value
    if name and rest:
        tables.insert(0, (name, [flatten(rest)]))
    return tables


def header_facts(data: Any) -> dict:
    """The top-level values that are not tables (shown as a list above them)."""
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if not _has_table(v) and (not isinstance(v, dict) or k in HEADER_KEYS)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table (columns in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """Where the report was made: CPU model, cores, OS, Python/torch versions, bitnet_torch backend."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "logical_cores": os.cpu_count(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    try:
        import torch

        import bitnet_torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["bitnet_torch_backend"] = bitnet_torch.backend_info()
    except ImportError as exc:  # the report still renders without the package
        info["bitnet_torch_backend"] = f"unavailable: {exc}"
    return info


def label(row: dict) -> str:
    """Plot label of a row: its short string fields plus its shape fields (``M=1 K=2560 N=3840``)."""
    parts = [str(v) for v in row.values() if isinstance(v, str) and len(v) <= 40][:2]
    shape = [f"{k}={row[k]}" for k in ("M", "K", "N", "m", "k", "n", "shape", "batch", "tokens")
             if k in row and not isinstance(row[k], str)]
    return " ".join(parts + shape) or "row"


RATIO_KEYS = ("ratio", "speedup", "x_vs", "_vs_", "fraction_of")


def _numeric_keys(rows: list[dict], patterns: tuple[str, ...]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)
                 and any(p in k.lower() for p in patterns)]
    return keys


def plot(sections: list[tuple[str, list[dict]]], path: Path) -> bool:
    """Bar panels per section: one for same-run ratios (dashed line at 1.0), one for rates; False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rate_patterns = tuple(p for p in PLOT_KEYS if p not in RATIO_KEYS)
    panels = []
    for title, rows in sections:
        for kind, patterns in (("same-run ratios", RATIO_KEYS), ("rates", rate_patterns)):
            keys = _numeric_keys(rows, patterns)
            if keys:
                panels.append((f"{title}: {kind}", rows, keys, kind == "same-run ratios"))
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.4 * len(panels)), squeeze=False)
    for ax, (title, rows, keys, is_ratio) in zip(axes[:, 0], panels):
        width = 0.8 / len(keys)
        positions = range(len(rows))
        for i, key in enumerate(keys):
            values = [r.get(key) if isinstance(r.get(key), (int, float)) else float("nan") for r in rows]
            ax.bar([p + i * width for p in positions], values, width=width, label=key)
        if is_ratio:
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        positive = [r[k] for r in rows for k in keys if isinstance(r.get(k), (int, float)) and r[k] > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")  # e.g. prefill and decode tokens/s side by side
        ax.set_xticks([p + width * (len(keys) - 1) / 2 for p in positions])
        ax.set_xticklabels([label(r) for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(result_files: list[Path], out_dir: Path) -> Path:
    """Write ``report.md`` (+ ``report.png`` when something is plottable) into ``out_dir``; returns the .md path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, list[dict]]] = []
    body: list[str] = []
    for path in result_files:
        data = json.loads(path.read_text(encoding="utf-8"))
        title = (data.get("benchmark") or data.get("name") or path.stem) if isinstance(data, dict) else path.stem
        body.append(f"## {title}\n")
        body.append(f"Source: `{path.name}`\n")
        for key, value in header_facts(data).items():
            body.append(f"- **{key}**: `{json.dumps(value, default=str)}`")
        body.append("")
        tables = find_tables(data)
        if not tables:
            body.append("_no result rows found in this file_\n")
        for name, rows in tables:
            body.append(f"### {name}\n")
            body.append(markdown_table(rows) + "\n")
            sentences = speedup_sentences(rows)
            if sentences:
                body.append("In words (speedup = baseline time / our time, same run):\n")
                body += [f"- {line}" for line in sentences] + [""]
            sections.append((f"{title} / {name}", rows))
    machine = machine_info()
    head = ["# bitnet_torch benchmark report\n", "## Machine\n"]
    head += [f"- **{k}**: {json.dumps(v, default=str) if isinstance(v, dict) else v}" for k, v in machine.items()]
    head.append("")
    png = out_dir / "report.png"
    if plot(sections, png):
        head.append("![same-run ratios and rates](report.png)\n")
    md = out_dir / "report.md"
    md.write_text("\n".join(head + body) + "\n", encoding="utf-8")
    (out_dir / "machine.json").write_text(json.dumps(machine, indent=2, default=str), encoding="utf-8")
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="benchmark JSON files")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    args = parser.parse_args()
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"result files not found: {', '.join(missing)}")
    print(write_report(args.results, args.out))


if __name__ == "__main__":
    main()

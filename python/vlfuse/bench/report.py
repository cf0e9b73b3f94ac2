"""Output of a run: the printed table, the JSON file and the speedup bar chart."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _rate(record: dict) -> str:
    if record.get("vlfuse_rate") is None:
        return "-"
    rate = record["vlfuse_rate"]
    unit = record["rate_unit"]
    return f"{rate:.1f} {unit}" if rate >= 1 else f"{rate:.3f} {unit}"


def _pct(record: dict) -> str:
    value = record.get("pct_of_limit")
    if value is None:
        return "-"
    return f"{value:.0f}% {'copy' if record['limit_kind'] == 'bandwidth' else 'GEMM'}"


def _target(record: dict) -> str:
    if not record.get("target"):
        return ""
    met = record.get("target_met")
    return {True: "met", False: "MISSED", None: "n/a"}[met] + f" ({record['target']})"


COLUMNS = (
    ("op", lambda r: r["op"]),
    ("case", lambda r: r["case"]),
    ("shape", lambda r: r["shape"] or ""),
    ("dtype", lambda r: r["dtype"]),
    ("pass", lambda r: r["pass"]),
    ("check", lambda r: r["check"] if r["check"] == "ok" else (r["check"] or "")[:40]),
    ("vlfuse ms", lambda r: _ms(r["vlfuse_ms"])),
    ("HF eager ms", lambda r: _ms(r["eager_ms"])),
    ("compile ms", lambda r: _ms(r["compile_ms"])),
    ("vs eager", lambda r: _x(r["speedup_eager"])),
    ("vs compile", lambda r: _x(r["speedup_compile"])),
    ("achieved", _rate),
    ("of limit", _pct),
    ("MiB vlfuse/eager", lambda r: f"{_mib(r['mem_vlfuse_bytes'])}/{_mib(r['mem_eager_bytes'])}"),
    ("target", _target),
)


def machine_lines(machine: dict) -> list[str]:
    lines = [
        f"device: {machine['device']} ({machine['device_type']}), threads: {machine['threads']}, "
        f"torch {machine['torch']}, vlfuse {machine['vlfuse']}, transformers {machine.get('transformers')}"
    ]
    if "copy_gbs" in machine:
        gemm = ", ".join(f"{k} {v:.3g}" for k, v in machine["gemm_tflops"].items())
        lines.append(
            f"measured limits: copy {machine['copy_gbs']:.1f} GB/s ({machine['copy_buffer_mib']:.0f} MiB buffer), "
            f"GEMM {machine['gemm_size']}^3 TFLOP/s: {gemm}"
        )
    timing = machine.get("timing")
    if timing:
        lines.append(
            f"timing: median of {timing['repeats']} interleaved samples after {timing['warmup']} warm-up calls "
            f"(samples >= {timing['min_sample_s'] * 1e3:.0f} ms); per-case limits (copy of a buffer of the case's "
            "size, plain GEMMs of its sizes) timed in the same loop"
        )
    return lines


def format_table(records: Sequence[dict]) -> str:
    rows = [[name for name, _ in COLUMNS]] + [[str(cell(r)) for _, cell in COLUMNS] for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: dict) -> str:
    parts = machine_lines(report["machine"]) + ["", format_table(report["results"])]
    notes = [(r, n) for r in report["results"] for n in r.get("notes", [])]
    if notes:
        parts.append("")
        parts += [f"note: {r['op']} / {r['case']} / {r['dtype']} / {r['pass']}: {n}" for r, n in notes]
    for record in report["results"]:
        if record.get("profile"):
            parts += ["", format_profile(record)]
    return "\n".join(parts)


def format_profile(record: dict) -> str:
    """The per-part time breakdown of one case, as a small table per implementation."""
    lines = [f"where the time goes: {record['op']} / {record['case']} / {record['dtype']} / {record['pass']}"]
    for impl, parts in record["profile"].items():
        parts = dict(parts)
        total = parts.pop("total", None) or sum(parts.values()) or 1.0
        lines.append(f"  {impl}: {total:.1f} ms in one profiled call")
        for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {part:<36} {ms:9.2f} ms  {100 * ms / total:5.1f}%")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=2, default=_json_default)
        handle.write("\n")


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def plot_speedups(report: dict, path: str) -> None:
    """Horizontal bars: speedup over HF eager and over torch.compile per timed case; 1x marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in report["results"] if r.get("speedup_eager") is not None]
    labels = [f"{r['op']} | {r['case']} | {r['dtype']} | {r['pass']}" for r in records]
    height = 0.4
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.42 * len(records) + 1.2)))
    positions = range(len(records))
    ax.barh([p - height / 2 for p in positions], [r["speedup_eager"] for r in records], height, label="vs HF eager")
    compiled = [(p, r["speedup_compile"]) for p, r in zip(positions, records) if r.get("speedup_compile")]
    if compiled:
        ax.barh([p + height / 2 for p, _ in compiled], [s for _, s in compiled], height, label="vs torch.compile")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(positions), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup of vlfuse (x, log scale; > 1 is faster)")
    machine = report["machine"]
    ax.set_title(f"vlfuse speedups on {machine['device']} ({machine['threads']} threads)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Output of a run: the printed table, the JSON file, the speedup bar chart, and the markdown of the results pages
(one per machine) and of the summary table across machines."""

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


# ---- markdown: a results page per machine and the summary table across machines ------------------------------

MARKDOWN_LEGEND = (
    "Speedups of vlfuse over HF transformers' own Qwen2-VL code (eager and `torch.compile`, same weights and inputs, "
    "outputs checked equal first, or where HF eager is itself inexact checked against HF's code in float64), medians "
    "of interleaved runs; *of limit* is the share of this machine's copy bandwidth (memory-bound ops, for the bytes "
    "they must move) or of plain GEMMs of the same sizes, measured in the same run. Reproduce with "
    "`python -m vlfuse bench --json FILE`."
)


def _device_words(machine: dict) -> str:
    return " ".join(w for w in machine["device"].replace("(R)", "").replace("(TM)", "").split() if w != "Processor")


def machine_title(machine: dict) -> str:
    """The machine as its results page names it: for a CPU the model name, family and model numbers (the core
    generation, which a VM's model name hides) and the vlfuse build it ran; for a GPU its name."""
    if machine["device_type"] != "cpu":
        return _device_words(machine)
    parts = [_device_words(machine)]
    if "cpu_family" in machine:
        parts.append(f"family {machine['cpu_family']} model {machine['cpu_model']}")
    else:
        parts.append("family and model not recorded")
    if machine.get("vlfuse_cpu_isa"):
        parts.append(f"vlfuse {machine['vlfuse_cpu_isa']} build")
    return ", ".join(parts)


def machine_label(machine: dict) -> str:
    """A short name for a table header, e.g. "AMD EPYC f25m17 AVX512_BF16"."""
    words = [_device_words(machine)]
    if "cpu_family" in machine:
        words.append(f"f{machine['cpu_family']}m{machine['cpu_model']}")
    if machine.get("vlfuse_cpu_isa"):
        words.append(machine["vlfuse_cpu_isa"])
    return " ".join(words)


def _md_ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _md_f(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _md_limit(record: dict) -> str:
    if record.get("pct_of_limit") is None:
        return "–"
    return f"{record['pct_of_limit']:.0f}% of {'copy' if record['limit_kind'] == 'bandwidth' else 'GEMM'}"


def _md_target(record: dict) -> str:
    if not record.get("target"):
        return ""
    return {True: "✅", False: "❌", None: "–"}[record.get("target_met")] + " " + record["target"]


def format_markdown(report: dict, source: str) -> str:
    """One machine's results as markdown: what was measured on what, every checked case's row, the cases not timed
    and the notes. source names the JSON file the text is generated from."""
    machine = report["machine"]
    gemm = ", ".join(f"{k} {v:.3g}" for k, v in machine.get("gemm_tflops", {}).items())
    lines = [
        MARKDOWN_LEGEND,
        "",
        f"### {machine_title(machine)}, {machine['threads']} threads",
        "",
        f"torch {machine['torch']}, transformers {machine.get('transformers')}, run {machine.get('date_utc', '?')}; "
        f"measured limits: copy {_md_f(machine.get('copy_gbs'), '.1f', ' GB/s')}, GEMM TFLOP/s {gemm}. "
        f"Full results: `{source}`.",
        "",
        "| op | case | dtype | pass | vlfuse ms | HF eager ms | compile ms | vs eager | vs compile | achieved "
        "| of limit | MiB vlfuse / eager | target |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in report["results"]:
        if r["check"] != "ok":
            continue
        mem = "–"
        if r.get("mem_vlfuse_bytes") is not None:
            mem = f"{r['mem_vlfuse_bytes'] / 2**20:.1f} / {r['mem_eager_bytes'] / 2**20:.1f}"
        rate = "–" if r.get("vlfuse_rate") is None else f"{r['vlfuse_rate']:.3g} {r['rate_unit']}"
        lines.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['pass']} | {_md_ms(r['vlfuse_ms'])} "
            f"| {_md_ms(r['eager_ms'])} | {_md_ms(r['compile_ms'])} | {_md_f(r['speedup_eager'], '.2f', 'x')} "
            f"| {_md_f(r['speedup_compile'], '.2f', 'x')} | {rate} | {_md_limit(r)} | {mem} | {_md_target(r)} |"
        )
    row = "{op} / {case} / {dtype} / {pass}"
    skipped = [r for r in report["results"] if r["check"] != "ok"]
    if skipped:
        lines += [""] + [f"- not timed: {row.format(**r)}: {r['check']}" for r in skipped]
    notes = sorted({f"{row.format(**r)}: {n}" for r in report["results"] for n in r.get("notes", [])})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


# the op families of the summary, in the order of its rows: (label, ops whose records it covers)
SUMMARY_OPS = (
    ("rope_qkv", ("rope_qkv",)),
    ("patch_embed", ("patch_embed",)),
    ("embed_frames", ("embed_frames",)),
    ("merge2x2", ("merge2x2",)),
    ("PatchMerger (2B, 7B)", ("PatchMerger 2B", "PatchMerger 7B")),
    ("vision tower", ("vision tower",)),
    ("train step (tiny)", ("train step (tiny)",)),
)


def _ratio(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2f}"


def _span(values: list[float]) -> str:
    if not values:
        return "–"
    low, high = _ratio(min(values)), _ratio(max(values))
    return f"{low}x" if low == high else f"{low}-{high}x"


def format_summary(reports: Sequence[tuple[dict, str]]) -> str:
    """One table across machines (reports: each run with the link to its results page): per op family, the range
    of vlfuse's speedup over HF eager / over torch.compile across the checked cases (workloads, dtypes, passes)."""
    if not reports:
        return "No results yet: run `python -m vlfuse bench --json benchmarks/results/<device>.json`."
    header = "| vs HF eager / vs torch.compile | " + " | ".join(
        f"[{machine_label(r['machine'])}]({link})" for r, link in reports
    )
    lines = [header + " |", "|---|" + "---|" * len(reports)]
    lines.append(
        "| run (UTC), threads | "
        + " | ".join(f"{r['machine'].get('date_utc', '?')[:10]}, {r['machine']['threads']}" for r, _ in reports)
        + " |"
    )
    for label, ops in SUMMARY_OPS:
        cells = []
        for report, _ in reports:
            checked = [r for r in report["results"] if r["op"] in ops and r["check"] == "ok"]
            eager = [r["speedup_eager"] for r in checked if r.get("speedup_eager") is not None]
            compiled = [r["speedup_compile"] for r in checked if r.get("speedup_compile") is not None]
            cells.append(f"{_span(eager)} / {_span(compiled)}" if eager else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

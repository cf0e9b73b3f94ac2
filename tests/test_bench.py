"""The benchmark runner's machinery on tiny cases: it runs, its JSON has the promised schema, and a wrong result
is caught before any timing is reported. No timing is asserted anywhere."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

import vlfuse  # noqa: F401  (loads the native library)
from vlfuse.bench import cli, report, runner, suite
from vlfuse.bench.core import FWD, FWD_BWD, Case, Target, Unavailable, tolerance
from vlfuse.bench.memory import peak_bytes
from vlfuse.bench.rope import build_rope_qkv
from vlfuse.bench.timing import TimingConfig, time_interleaved

pytest.importorskip("transformers")

TINY_GRID = (("grid", ((1, 4, 4), (2, 4, 6))),)  # an image and a two-frame non-square video: 64 tokens
FAST = TimingConfig(warmup=1, repeats=3, min_sample_s=0.001, max_case_s=1.0)


def _options(**overrides) -> runner.RunOptions:
    values = dict(timing=FAST, compile=False, measure_limits=False, quick=True, log=lambda line: None)
    values.update(overrides)
    return runner.RunOptions(**values)


def _tiny_cases() -> list[Case]:
    target = Target(speedup_eager=1.0)
    return [
        Case("rope_qkv", "tiny", torch.float32, FWD, build_rope_qkv, TINY_GRID, target, True),
        Case("rope_qkv", "tiny", torch.bfloat16, FWD_BWD, build_rope_qkv, TINY_GRID, target, True),
    ]


def _wrong_rope(case, device):
    """rope_qkv with v perturbed: the kind of bug the check must stop before timing."""
    setup = build_rope_qkv(case, device)
    right = setup.vlfuse

    def wrong(qkv):
        q, k, v = right(qkv)
        return q, k, v * 1.01

    return dataclasses.replace(setup, vlfuse=wrong)


def _scaled_v(fn, scale):
    """fn with its v output scaled: off the exact result by a known relative error."""

    def scaled(qkv):
        q, k, v = fn(qkv)
        return q, k, v * scale

    return scaled


def _inexact_eager(case, device):
    """rope_qkv whose HF eager baseline is off by 1% (v scaled), with HF's exact code as the float64 reference."""
    setup = build_rope_qkv(case, device)
    return dataclasses.replace(setup, eager=_scaled_v(setup.eager, 1.01), reference=setup.eager)


def _unavailable(case, device):
    raise Unavailable("vlfuse.not_an_op is not in this build")


REQUIRED_RECORD_KEYS = {
    "op", "case", "dtype", "pass", "vlfuse_ms", "eager_ms", "compile_ms",
    "speedup_eager", "speedup_compile", "pct_of_limit",
}  # fmt: skip


def test_tiny_suite_runs_and_reports():
    result = runner.run_suite(_tiny_cases(), _options())
    assert [r["check"] for r in result["results"]] == ["ok", "ok"]
    for record in result["results"]:
        assert REQUIRED_RECORD_KEYS <= set(record)
        assert record["vlfuse_ms"] > 0 and record["eager_ms"] > 0 and record["limit_ms"] > 0
        assert record["speedup_eager"] == pytest.approx(record["eager_ms"] / record["vlfuse_ms"])
        assert record["pct_of_limit"] == pytest.approx(100 * record["limit_ms"] / record["vlfuse_ms"])
        assert record["rate_unit"] == "GB/s" and record["limit_kind"] == "bandwidth"
        assert record["mem_vlfuse_bytes"] > 0 and record["mem_eager_bytes"] > 0
        assert record["target_met"] in (True, False)
    text = report.format_report(result)
    assert "rope_qkv" in text and "HF eager ms" in text


def test_wrong_result_is_caught_before_timing():
    case = Case("rope_qkv", "tiny wrong", torch.float32, FWD, _wrong_rope, TINY_GRID)
    grad_case = dataclasses.replace(case, mode=FWD_BWD)
    result = runner.run_suite([case, grad_case], _options())
    for record in result["results"]:
        assert record["check"].startswith("FAIL"), record["check"]
        assert record["max_err"] > record["tol"]
        assert record["vlfuse_ms"] is None and record["eager_ms"] is None and record["speedup_eager"] is None
    assert len(runner.failed(result)) == 2


def test_unavailable_op_is_skipped_not_failed():
    case = Case("not_an_op", "tiny", torch.float32, FWD, _unavailable, TINY_GRID)
    result = runner.run_suite([case], _options())
    assert result["results"][0]["check"].startswith("skipped")
    assert runner.failed(result) == []


def _broken_builder(case, device):
    raise RuntimeError("the builder broke")


def test_broken_builder_fails_its_case_and_the_suite_goes_on():
    broken = Case("rope_qkv", "tiny broken", torch.float32, FWD, _broken_builder, TINY_GRID)
    result = runner.run_suite([broken, *_tiny_cases()[:1]], _options())
    assert result["results"][0]["check"] == "error: RuntimeError: the builder broke"
    assert result["results"][1]["check"] == "ok"
    assert len(runner.failed(result)) == 1


def test_extras_are_timed_beside_the_implementations():
    case = _tiny_cases()[0]
    calls = []

    def build(case, device, plain=case.build):
        setup = plain(case, device)
        return dataclasses.replace(setup, extras={"plain copy": lambda: calls.append(1)})

    result = runner.run_suite([dataclasses.replace(case, build=build)], _options())
    record = result["results"][0]
    assert record["check"] == "ok" and calls
    assert set(record["extra_ms"]) == {"plain copy"} and record["extra_ms"]["plain copy"] > 0
    assert any("plain copy" in note for note in record["notes"])


def test_compile_unavailable_is_noted(monkeypatch):
    def no_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compile)
    record = runner.run_suite(_tiny_cases()[:1], _options(compile=True))["results"][0]
    assert record["check"] == "ok" and record["compile_ms"] is None and record["speedup_compile"] is None
    assert any("torch.compile unavailable" in note for note in record["notes"])


@pytest.mark.slow
def test_compiled_baseline_is_timed():
    record = runner.run_suite(_tiny_cases()[:1], _options(compile=True))["results"][0]
    assert record["compile_ms"] > 0 and record["speedup_compile"] > 0 and record["compile_s"] > 0


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    return args.func(args)


def test_cli_quick_writes_json_and_plot(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(suite, "all_cases", _tiny_cases)
    json_path, png_path = tmp_path / "out.json", tmp_path / "out.png"
    code = _cli(["--quick", "--no-compile", "--repeats", "3", "--json", str(json_path), "--plot", str(png_path)])
    assert code == 0
    data = json.loads(json_path.read_text())
    assert {"device", "threads", "torch"} <= set(data["machine"])
    assert data["machine"]["threads"] == torch.get_num_threads()
    assert data["machine"]["copy_gbs"] > 0 and set(data["machine"]["gemm_tflops"]) >= {"float32", "bfloat16"}
    assert isinstance(data["results"], list) and len(data["results"]) == 2
    for record in data["results"]:
        assert REQUIRED_RECORD_KEYS <= set(record)
        assert record["pass"] in ("fwd", "fwd+bwd") and record["dtype"] in ("float32", "bfloat16")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rope_qkv" in capsys.readouterr().out


def test_cli_exit_code_flags_a_wrong_result(monkeypatch, capsys):
    monkeypatch.setattr(suite, "all_cases", lambda: [Case("rope_qkv", "tiny wrong", torch.float32, FWD, _wrong_rope, TINY_GRID, quick=True)])
    assert _cli(["--quick", "--no-compile", "--no-memory", "--repeats", "3"]) == 1
    assert "failed the correctness check" in capsys.readouterr().out


def test_case_selection():
    cases = suite.all_cases()
    quick = suite.select(cases, quick=True)
    assert quick and all(c.quick for c in quick) and len(quick) < len(cases)
    ops = {c.op for c in cases}
    assert {"rope_qkv", "patch_embed", "merge2x2"} <= ops
    picked = suite.select(cases, patterns=["rope_qkv/*/bfloat16/fwd"])
    assert picked and all(c.op == "rope_qkv" and c.dtype == torch.bfloat16 and c.mode == FWD for c in picked)
    # the workloads: 1, 4, 16 images of 448x448 and a 16-frame video; both dtypes and passes
    names = {c.name for c in cases if c.op == "rope_qkv"}
    assert names == {"1 image 448x448", "4 images 448x448", "16 images 448x448", "video 16f 448x448"}
    assert {(c.dtype, c.mode) for c in cases if c.op == "merge2x2"} == {
        (d, m) for d in (torch.float32, torch.bfloat16) for m in (FWD, FWD_BWD)
    }


def test_peak_memory_sees_outputs_and_temporaries():
    size = 1 << 20

    def allocate():
        temporary = torch.ones(size, dtype=torch.float32)  # 4 MiB, freed before returning
        return temporary.sum() + torch.zeros(size // 2, dtype=torch.float32).sum()

    assert peak_bytes(allocate, torch.device("cpu")) >= 4 * size


def test_interleaved_timing_times_every_function():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1

        return fn

    seconds = time_interleaved({"a": make("a"), "b": make("b")}, torch.device("cpu"), FAST)
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
    assert calls["a"] > FAST.repeats and calls["b"] > FAST.repeats


def _render_results_module():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "render_results.py"
    spec = importlib.util.spec_from_file_location("render_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_pages_and_readme_summary_are_generated_between_markers(tmp_path):
    render_results = _render_results_module()
    results = tmp_path / "results"
    report.write_json(runner.run_suite(_tiny_cases(), _options()), str(results / "cpu-test.json"))
    readme = tmp_path / "README.md"
    readme.write_text("# vlfuse\n\nintro\n")
    argv = ["--readme", str(readme), "--results", str(results)]
    assert render_results.main(argv) == 0
    page = results / "cpu-test.md"
    first_page, first_readme = page.read_text(), readme.read_text()
    # the page: every checked row, under a title naming the machine
    assert first_page.startswith("# ") and first_page.count(render_results.BEGIN) == 1
    assert "| rope_qkv | tiny | float32 | fwd |" in first_page
    assert "| rope_qkv | tiny | bfloat16 | fwd+bwd |" in first_page
    # README: the summary across machines, linking the page, and no per-case rows
    assert first_readme.startswith("# vlfuse\n\nintro\n") and first_readme.count(render_results.BEGIN) == 1
    assert "(results/cpu-test.md)" in first_readme and "| rope_qkv |" in first_readme
    assert "| rope_qkv | tiny |" not in first_readme
    # a second run replaces the sections in place (hand edits outside the markers survive), and --check agrees
    page.write_text(first_page.replace("\n", "\n\nNotes on this run.\n", 1))
    readme.write_text(first_readme.replace("intro", "intro, edited"))
    assert render_results.main(argv + ["--check"]) == 0
    (results / "cpu-test.json").write_text((results / "cpu-test.json").read_text().replace('"tiny"', '"tiny2"'))
    assert render_results.main(argv + ["--check"]) == 1
    assert render_results.main(argv) == 0
    assert "Notes on this run." in page.read_text() and "| rope_qkv | tiny2 |" in page.read_text()
    assert "intro, edited" in readme.read_text() and readme.read_text().count(render_results.BEGIN) == 1
    assert render_results.main(argv + ["--check"]) == 0


def test_committed_results_pages_and_readme_summary_match_the_json():
    """README's summary and each benchmarks/results/<machine>.md are what render_results.py makes of the stored JSON."""
    assert _render_results_module().main(["--check"]) == 0


def test_summary_names_each_cpu_by_family_model_and_isa():
    machine = {"device": "Intel(R) Xeon(R) Processor", "device_type": "cpu", "threads": 2, "date_utc": "2026-12-03",
               "cpu_family": 6, "cpu_model": 167, "vlfuse_cpu_isa": "AVX512_BF16"}
    records = [
        {"op": "rope_qkv", "check": "ok", "speedup_eager": 5.0, "speedup_compile": 2.0},
        {"op": "rope_qkv", "check": "ok", "speedup_eager": 20.0, "speedup_compile": None},
        {"op": "rope_qkv", "check": "FAIL: off", "speedup_eager": None, "speedup_compile": None},
    ]
    table = report.format_summary([({"machine": machine, "results": records}, "results/x.md")])
    assert "[Intel Xeon f6m167 AVX512_BF16](results/x.md)" in table
    assert "| rope_qkv | 5.00-20x / 2.00x |" in table and "| merge2x2 | – |" in table


def test_tower_breakdown_parts_add_up():
    qwen2_vl = pytest.importorskip("vlfuse.models.qwen2_vl")
    from vlfuse.bench.model import part_breakdown

    config = qwen2_vl.Qwen2VLVisionConfig(depth=2, embed_dim=32, hidden_size=64, num_heads=2)
    tower = qwen2_vl.VisionTransformer(config).eval()
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, config.patch_dim)
    with torch.no_grad():
        parts = part_breakdown(lambda: tower(pixels, grid))
    assert {"GEMMs", "attention", "rotary", "bias + activation epilogues"} <= set(parts)
    assert parts["GEMMs"] > 0 and parts["attention"] > 0 and parts["rotary"] > 0
    named = sum(v for k, v in parts.items() if k != "total")
    assert parts["total"] > 0 and named == pytest.approx(parts["total"], rel=1e-3, abs=1e-2)


def test_inexact_baseline_is_judged_by_its_float64_run():
    """When HF eager itself is off (here: made off on purpose), vlfuse passes if it matches HF's code in float64."""
    case = Case("rope_qkv", "tiny", torch.float32, FWD, _inexact_eager, TINY_GRID)
    record = runner.run_suite([case], _options())["results"][0]
    assert record["check"] == "ok" and record["max_err"] <= record["tol"]
    assert any("HF eager by" in note for note in record["notes"])
    wrong = runner.run_suite([dataclasses.replace(case, build=lambda c, d: dataclasses.replace(_wrong_rope(c, d), reference=build_rope_qkv(c, d).eager))], _options())
    assert wrong["results"][0]["check"].startswith("FAIL")


@pytest.mark.parametrize("vlfuse_scale, passes", [(0.99, True), (0.97, False)])
def test_inexact_vlfuse_passes_when_no_further_off_than_hf_eager(vlfuse_scale, passes):
    """Past tolerance, with HF eager off by 2% too (as bf16 towers' weight gradients are): vlfuse passes when it is
    no further from HF's code in float64 than HF eager itself."""
    def build(case, device):
        setup = build_rope_qkv(case, device)
        exact = setup.eager
        return dataclasses.replace(
            setup, vlfuse=_scaled_v(exact, vlfuse_scale), eager=_scaled_v(exact, 1.02), reference=exact
        )

    case = Case("rope_qkv", "tiny", torch.float32, FWD, build, TINY_GRID)
    record = runner.run_suite([case], _options())["results"][0]
    assert (record["check"] == "ok") == passes, record["check"]
    assert record["max_err"] > tolerance(torch.float32, 1.0)


def test_cpu_slug_names_the_core_generation_and_the_build():
    from vlfuse.bench import machine

    slug = machine.device_slug(torch.device("cpu"))
    assert slug.startswith("cpu-") and slug == slug.lower() and " " not in slug
    assert slug.endswith("-".join(machine._slug_words(vlfuse.build_info()["cpu_isa"])))
    signature = machine.cpu_signature()
    if signature:  # Linux: /proc/cpuinfo gives the family and model numbers
        assert f"-f{signature['cpu_family']}m{signature['cpu_model']}-" in slug
        assert machine.machine_info(torch.device("cpu"), measure_limits=False, quick=True)["cpu_family"] == (
            signature["cpu_family"]
        )


@pytest.mark.parametrize("compiled_error, timed", [(0.0, True), (0.05, False)])
def test_compiled_baseline_off_eager_is_judged_by_the_float64_run(monkeypatch, compiled_error, timed):
    """A compiled baseline that disagrees with an inexact eager is timed when it is as close to HF's code in
    float64 as eager is (off by 1%), and left out when it is further."""
    case = Case("rope_qkv", "tiny", torch.float32, FWD, _inexact_eager, TINY_GRID)
    compiled = _scaled_v(build_rope_qkv(case, "cpu").eager, 1 + compiled_error)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled)
    record = runner.run_suite([case], _options(compile=True))["results"][0]
    assert record["check"] == "ok"
    assert (record["speedup_compile"] is not None) == timed
    assert any(note.endswith("timed" if timed else "not timed") and "in float64 it is off by" in note
               for note in record["notes"])

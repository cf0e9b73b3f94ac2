"""The GPU check (`python -m vlfuse gpu-check`) without a GPU: the dry run goes through every step, CUDA-only
ones reported as skipped, so the check cannot rot between the rare GPU runs; and the driver's time boxes, verdict
and the parsers of the GPU tools' output (which only a GPU run feeds) on made-up input."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vlfuse
from vlfuse.gpucheck import steps

ROOT = Path(__file__).resolve().parents[1]

# what a dry run reports for each step on a machine without a GPU
DRY_RUN_STATUS = {
    "environment": "ok",
    "build": "ok",  # cmake configure only
    "pytest-cuda": "skipped",
    "exercise": "ok",
    "memcheck": "skipped",
    "racecheck": "skipped",
    "synccheck": "skipped",
    "ncu": "skipped",  # its workload runs at tiny sizes
    "cuda-graph": "skipped",  # the tower runs eagerly
    "bench-ops": "ok",  # tiny sizes on the CPU
    "bench-tower": "ok",
    "static": "skipped",  # collected only: tests/test_cuda_static.py runs in `make test` itself
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ)
    # the check and its children import the vlfuse this test imported (the installed one under `make test`)
    package_root = str(Path(vlfuse.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "vlfuse", "gpu-check", "--dry-run", "--out", str(out), "--source", str(ROOT)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    return done, out


def test_dry_run_passes_and_prints_the_summary(dry_run):
    done, _ = dry_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "gpu-check dry run (no GPU): pass" in done.stdout


def test_dry_run_json_names_every_step_with_its_outcome(dry_run):
    _, out = dry_run
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True and report["verdict"] == "pass"
    assert [r["name"] for r in report["steps"]] == [s.name for s in steps.STEPS] == list(DRY_RUN_STATUS)
    got = {r["name"]: r["status"] for r in report["steps"]}
    assert got == DRY_RUN_STATUS, {r["name"]: r["summary"] for r in report["steps"]}
    by_name = {r["name"]: r for r in report["steps"]}
    # the sanitizer steps record the command the GPU run will use
    assert "--tool racecheck" in by_name["racecheck"]["commands"][0]
    assert by_name["exercise"]["details"]["cases"] > 20 and not by_name["exercise"]["details"]["mismatches"]
    for group in ("bench-ops", "bench-tower"):
        results = by_name[group]["details"]["results"]
        assert results and all(r["check"] == "ok" for r in results), [(r["op"], r["check"]) for r in results]


def test_dry_run_writes_the_log_and_the_bench_json(dry_run):
    _, out = dry_run
    log = (out / "gpu-check.log").read_text()
    for step in steps.STEPS:
        assert f"===== {step.name}:" in log
    bench = list(out.glob("bench-*.json"))
    assert len(bench) == 1
    report = json.loads(bench[0].read_text())
    assert {"machine", "results"} <= set(report) and len(report["results"]) > 5
    assert len(list(out.iterdir())) <= 3  # what a GPU machine's transport brings back is limited


def _context(tmp_path, deadline_s=60.0) -> steps.Context:
    return steps.Context(
        out=tmp_path,
        work=tmp_path,
        source=None,
        dry_run=True,
        jobs=1,
        deadline=time.monotonic() + deadline_s,
        log_path=tmp_path / "log",
    )


def test_a_step_past_its_time_box_is_killed_with_its_children(tmp_path):
    ctx = _context(tmp_path)
    ctx.log_path.write_text("")
    ctx.step_deadline = time.monotonic() + 1.0
    record = {"commands": []}
    began = time.monotonic()
    done = ctx.call(record, ["bash", "-c", "echo started; sleep 60 & wait"])
    assert done.timed_out and time.monotonic() - began < 20
    assert "started" in done.output and "timed out" in done.failure("x")


def test_verdict_fails_on_a_gate_step_and_later_steps_still_run(tmp_path, monkeypatch):
    def fail(ctx, record):
        steps._set(record, steps.FAIL, "made to fail")

    def crash(ctx, record):
        raise RuntimeError("made to crash")

    def ok(ctx, record):
        steps._set(record, steps.OK, "fine")

    fake = (
        steps.Step("environment", "env", ok, 5, 5, gate=True, needs_build=False),
        steps.Step("build", "build", ok, 5, 5, gate=True, needs_build=False),
        steps.Step("parity", "a gate", fail, 5, 5, gate=True),
        steps.Step("extra", "not a gate", crash, 5, 5),
        steps.Step("after", "runs anyway", ok, 5, 5, gate=True),
    )
    monkeypatch.setattr(steps, "STEPS", fake)
    assert steps.run_check(str(tmp_path), dry_run=True) == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["verdict"] == "FAIL: parity"
    assert [r["status"] for r in report["steps"]] == ["ok", "ok", "fail", "error", "ok"]
    assert "made to crash" in report["steps"][3]["summary"]


NCU_CSV = """==PROF== Connected to process 1234
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1234","python3","h","void vlfuse::merge::(anonymous namespace)::backward_kernel<c10::BFloat16, float>(vlfuse::merge::Params)","1","7","(256, 1, 1)","(528, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","81.52"
"0","1234","python3","h","void vlfuse::merge::(anonymous namespace)::backward_kernel<c10::BFloat16, float>(vlfuse::merge::Params)","1","7","(256, 1, 1)","(528, 1, 1)","0","9.0","Command line profiler metrics","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum","","1,024"
"1","1234","python3","h","void vlfuse::rope::(anonymous namespace)::rope_kernel<c10::BFloat16, long, false, 8>(vlfuse::rope::Params)","1","7","(32, 8, 1)","(2048, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","12,345"
"""


def test_ncu_csv_is_read_per_kernel():
    rows = steps._ncu_rows(NCU_CSV)
    assert [r["name"] for r in rows] == [
        "void merge::backward_kernel<c10::BFloat16, float>",
        "void rope::rope_kernel<c10::BFloat16, long, false, 8>",
    ]
    assert rows[0]["dram__throughput.avg.pct_of_peak_sustained_elapsed"] == 81.52
    assert rows[0]["l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"] == 1024.0
    assert rows[1]["gpu__time_duration.sum"] == 12345.0
    assert "merge::backward_kernel" in steps._ncu_line(rows[0])


@pytest.mark.parametrize(
    "line, errors",
    [
        ("========= ERROR SUMMARY: 0 errors", 0),
        ("========= ERROR SUMMARY: 3 errors", 3),
        ("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)", 1),
    ],
)
def test_sanitizer_summaries_are_read(line, errors):
    assert steps.sanitizer_errors("========= COMPUTE-SANITIZER\n" + line + "\n") == errors
    assert steps.sanitizer_errors("no summary") is None


FAKE_SANITIZER = """#!/usr/bin/env bash
# compute-sanitizer stand-in: drops its options, runs the program on the CPU, reports what the test asks
while [[ $1 == --* ]]; do shift 2; done
[[ -n $FAKE_INTERNAL ]] && echo "========= Internal Sanitizer Error: The Sanitizer failed to handle a hardware exception." && exit 99
echo "========= ERROR SUMMARY: $FAKE_ERRORS errors"
[[ $FAKE_ERRORS != 0 ]] && exit 99
exec "${@/#cuda/cpu}"
"""

FAKE_NCU = """#!/usr/bin/env bash
# ncu stand-in: writes a made-up report where --log-file says, runs nothing
while [[ $# -gt 0 ]]; do [[ $1 == --log-file ]] && cp "$FAKE_CSV" "$2"; shift; done
"""


@pytest.fixture
def gpu_tools(tmp_path, monkeypatch):
    """A context that believes it has a GPU, with compute-sanitizer and ncu replaced by scripts."""
    tools = {}
    for name, text in (("compute-sanitizer", FAKE_SANITIZER), ("ncu", FAKE_NCU)):
        tools[name] = tmp_path / name
        tools[name].write_text(text)
        tools[name].chmod(0o755)
    monkeypatch.setattr(steps, "find_tool", lambda name: str(tools[name]) if name in tools else None)
    (tmp_path / "report.csv").write_text(NCU_CSV)
    monkeypatch.setenv("FAKE_CSV", str(tmp_path / "report.csv"))
    ctx = _context(tmp_path)
    ctx.dry_run = False
    ctx.facts = {"cuda_available": True}
    ctx.log_path.write_text("")
    ctx.step_deadline = time.monotonic() + 120
    return ctx


def _record():
    return {"commands": [], "details": {}, "status": None, "summary": ""}


@pytest.mark.parametrize("errors, status", [(0, "ok"), (3, "fail")])
def test_sanitizer_step_runs_the_exercise_and_reads_the_summary(gpu_tools, monkeypatch, errors, status):
    monkeypatch.setenv("FAKE_ERRORS", str(errors))
    record = _record()
    steps._sanitizer_step("memcheck")(gpu_tools, record)
    assert record["status"] == status, record["summary"]
    assert record["details"]["errors"] == errors
    assert "--kernel-name kns=vlfuse" in record["commands"][0] and "--tool memcheck" in record["commands"][0]


def test_racecheck_leaves_out_the_cublas_calls_and_checks_the_rest(gpu_tools, monkeypatch):
    monkeypatch.setenv("FAKE_ERRORS", "0")
    record = _record()
    steps._sanitizer_step("racecheck")(gpu_tools, record)
    assert record["status"] == "ok", record["summary"]
    names = [case["name"] for case in json.loads((gpu_tools.work / "exercise-racecheck.json").read_text())["cases"]]
    assert not [n for n in names if n.startswith(("patch_embed", "embed_frames"))]
    assert [n for n in names if n.startswith("patchify")] and [n for n in names if n.startswith("merge2x2")]
    assert [n for n in names if n.startswith("interp_pos_embed")]


def test_a_sanitizer_breakdown_is_an_error_not_a_finding(gpu_tools, monkeypatch):
    monkeypatch.setenv("FAKE_ERRORS", "0")
    monkeypatch.setenv("FAKE_INTERNAL", "1")
    record = _record()
    steps._sanitizer_step("racecheck")(gpu_tools, record)
    assert record["status"] == "error" and "broke down" in record["summary"], record["summary"]


def test_ncu_step_reports_the_merge_backward_kernel(gpu_tools):
    record = _record()
    steps.step_ncu(gpu_tools, record)
    assert record["status"] == "ok", record["summary"]
    assert "merge::backward_kernel" in record["summary"] and "DRAM 81.52%" in record["summary"]
    assert "--clock-control none" in record["commands"][0]


def test_a_failed_environment_skips_every_other_step(tmp_path, monkeypatch):
    def no_gpu(ctx, record):
        steps._set(record, steps.FAIL, "no CUDA device")

    def must_not_run(ctx, record):
        raise AssertionError("ran without an environment")

    fake = (
        steps.Step("environment", "env", no_gpu, 5, 5, gate=True, needs_build=False),
        steps.Step("build", "build", must_not_run, 5, 5, gate=True, needs_build=False),
        steps.Step("static", "needs no build", must_not_run, 5, 5, needs_build=False),
    )
    monkeypatch.setattr(steps, "STEPS", fake)
    assert steps.run_check(str(tmp_path)) == 1
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [r["status"] for r in report["steps"]] == ["fail", "skipped", "skipped"]


def _fake_compiler(folder, name, libstdcxx):
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\necho {libstdcxx}\n")
    path.chmod(0o755)
    return str(path)


def test_the_build_takes_a_compiler_of_the_libstdcxx_torch_runs_with(tmp_path, monkeypatch):
    loaded = subprocess.run(
        [sys.executable, "-c", steps.LOADED_LIBSTDCXX], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not loaded:
        pytest.skip("no /proc/self/maps to read the loaded libstdc++ from")
    other = tmp_path / "opt" / "libstdc++.so.6"
    other.parent.mkdir()
    other.write_text("")
    foreign = _fake_compiler(tmp_path, "foreign-g++", other)
    native = _fake_compiler(tmp_path, "native-g++", loaded)
    monkeypatch.setattr(steps.shutil, "which", lambda name: {"c++": foreign, "g++": native}.get(name))
    cxx, why = steps.matching_compiler(sys.executable, preferred=foreign)
    assert cxx == native and os.path.realpath(loaded) in why
    monkeypatch.setattr(steps.os, "access", lambda path, mode: path in (foreign,))
    cxx, why = steps.matching_compiler(sys.executable, preferred=foreign)
    assert cxx is None and "no compiler found" in why and foreign in why

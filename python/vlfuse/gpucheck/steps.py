"""The steps of the GPU check and the driver that runs them.

Every step that can hang runs as a child process in its own process group with a time box: the smaller of the
step's box and what is left of the whole check's budget. Children write their output into the log as they run
and their structured results (JSON) into a work folder, which the driver folds into ``gpu-check.json`` after
each step, so a step killed at its time box still leaves what it had written. Only the driver writes into --out:
``gpu-check.json``, ``gpu-check.log`` and the benchmark's ``bench-<device>.json`` (three files, so the folder
survives transports that bring back only a few).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BUDGET_S = 480.0  # a GPU machine's command is cut at 10 minutes; this leaves room for its start-up
MIN_STEP_S = 10.0  # a step that would get less is skipped rather than started

OK, FAIL, ERROR, SKIPPED, WARN, PENDING = "ok", "fail", "error", "skipped", "warn", "pending"

# compute-sanitizer and Nsight Compute look only at vlfuse's kernels (all in namespace vlfuse): torch's own are
# neither instrumented (fast) nor reported (not ours)
SANITIZER_KERNELS = "kns=vlfuse"
NCU_KERNELS = "regex:vlfuse::"
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
    "smsp__inst_executed_op_shared_ld.sum",
    "smsp__inst_executed_op_shared_st.sum",
    "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum",
)
NCU_CORE_METRICS = NCU_METRICS[:4]  # the retry when this ncu does not know one of the others


@dataclass
class Context:
    out: Path
    work: Path
    source: Path | None
    dry_run: bool
    jobs: int
    deadline: float  # time.monotonic() by which the whole check ends
    log_path: Path
    python: str = sys.executable
    facts: dict = field(default_factory=dict)  # what the environment step found
    package_dir: Path | None = None  # where the built vlfuse package lies (put on the children's PYTHONPATH)
    step_deadline: float = 0.0

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        if self.package_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.package_dir), *filter(None, [env.get("PYTHONPATH")])])
        return env

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")

    def call(self, record: dict, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> "Completed":
        """Runs argv with its output appended to the log, killed (with its children) at the step's deadline."""
        timeout = max(1.0, self.step_deadline - time.monotonic())
        line = " ".join(_quote(a) for a in argv)
        record["commands"].append(line)
        self.log(f"$ {line}    # time box {timeout:.0f} s")
        start = self.log_path.stat().st_size
        began = time.monotonic()
        with open(self.log_path, "a") as handle:
            process = subprocess.Popen(
                argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else self.env(),
                cwd=str(cwd or self.source or Path.cwd()),
                start_new_session=True,
            )
            timed_out = False
            try:
                rc = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(process)
                rc = process.wait()
        seconds = time.monotonic() - began
        with open(self.log_path, "rb") as handle:
            handle.seek(start)
            output = handle.read().decode(errors="replace")
        self.log(f"# exit {rc}{' (killed at its time box)' if timed_out else ''} after {seconds:.1f} s\n")
        return Completed(rc, timed_out, seconds, output)


@dataclass
class Completed:
    rc: int
    timed_out: bool
    seconds: float
    output: str

    def failure(self, what: str) -> str:
        if self.timed_out:
            return f"{what}: timed out after {self.seconds:.0f} s"
        return f"{what}: exit {self.rc}: {_last_line(self.output)}"


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[Context, dict], None]
    box_s: float  # time box on a GPU
    dry_box_s: float  # time box in a dry run
    gate: bool = False  # its failure fails the check (build, parity, sanitizers)
    needs_build: bool = True  # skipped when the build failed


def _quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _kill_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        if wait_s is None:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("# exit")]
    return lines[-1][:300] if lines else "(no output)"


def _set(record: dict, status: str, summary: str, **details) -> None:
    record["status"] = status
    record["summary"] = summary
    record["details"].update(details)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_tool(name: str) -> str | None:
    """A CUDA or build tool: on PATH, beside this Python, or in the CUDA toolkit (CUDA_HOME, /usr/local/cuda)."""
    found = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        for sub in ("bin", "compute-sanitizer", "nsight-compute"):
            if root and os.access(os.path.join(root, sub, name), os.X_OK):
                return os.path.join(root, sub, name)
    return None


LOADED_LIBSTDCXX = (
    "import os, torch; maps = '/proc/self/maps'; "
    "print(next((l.split()[-1] for l in open(maps) if 'libstdc++' in l), '') if os.path.exists(maps) else '')"
)


def compiler_libstdcxx(cxx: str) -> str | None:
    """The libstdc++ a g++ compiles for (its real path), or None when it names none (not GCC, or not found)."""
    try:
        done = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    path = done.stdout.strip()
    return os.path.realpath(path) if done.returncode == 0 and os.path.isabs(path) else None


def matching_compiler(python: str, preferred: str | None) -> tuple[str | None, str]:
    """A C++ compiler that compiles for the libstdc++ python's torch runs with, preferring CXX, then c++ and g++ on
    PATH, then the system's; (None, why) when none can be told apart (then CMake's own choice stands)."""
    done = subprocess.run([python, "-c", LOADED_LIBSTDCXX], capture_output=True, text=True, timeout=120)
    loaded = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else ""
    if not loaded:
        return None, "could not read which libstdc++ torch runs with"
    loaded = os.path.realpath(loaded)
    candidates = [preferred, shutil.which("c++"), shutil.which("g++"), "/usr/bin/c++", "/usr/bin/g++"]
    seen = []
    for cxx in dict.fromkeys(c for c in candidates if c and os.access(c, os.X_OK)):
        own = compiler_libstdcxx(cxx)
        seen.append(f"{cxx} -> {own}")
        if own == loaded:
            return cxx, f"{cxx} compiles for {loaded}, the libstdc++ torch runs with"
    return None, f"no compiler found that compiles for {loaded} ({'; '.join(seen) or 'none found'})"


# An argument error whose message streams numbers: it must raise, not crash the process.
ERROR_MESSAGE_CHECK = (
    "import torch, vlfuse.ops as ops\n"
    "try:\n"
    "    ops.merge2x2(torch.randn(8, 6), torch.tensor([[1, 2, 4]]), torch.ones(7))\n"
    "except (RuntimeError, ValueError) as error:\n"
    "    print('raised:', error)\n"
)


def find_source(explicit: str | None) -> Path | None:
    """The checkout to build: --source, else the one this vlfuse package lies in, else the current folder."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parents[3], Path.cwd()]
    for candidate in candidates:
        cmake = candidate / "CMakeLists.txt"
        if cmake.is_file() and "project(vlfuse" in cmake.read_text():
            return candidate.resolve()
    if explicit:
        raise SystemExit(f"vlfuse gpu-check: --source {explicit} is not a vlfuse checkout (no CMakeLists.txt)")
    return None


# ---- the steps ---------------------------------------------------------------------------------------------


def step_environment(ctx: Context, record: dict) -> None:
    import torch

    facts = {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(),
        "source": str(ctx.source) if ctx.source else None,
        "cuda_available": torch.cuda.is_available(),
        "tools": {
            name: find_tool(name) for name in ("nvcc", "cmake", "ninja", "compute-sanitizer", "ncu", "cuobjdump")
        },
    }
    try:
        from importlib.metadata import version

        facts["transformers"] = version("transformers")
    except Exception:  # not installed: the HF comparisons report themselves skipped
        facts["transformers"] = None
    if facts["tools"]["nvcc"]:
        nvcc = subprocess.run([facts["tools"]["nvcc"], "--version"], capture_output=True, text=True, timeout=30)
        facts["nvcc"] = _last_line(nvcc.stdout)
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        major, minor = torch.cuda.get_device_capability(0)
        facts.update(
            device=torch.cuda.get_device_name(0),
            capability=f"{major}.{minor}",
            arch=f"{major}.{minor}{'a' if major >= 9 else ''}",  # sm_90a and later: the arch-specific features too
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        smi = find_tool("nvidia-smi")
        if smi:
            query = subprocess.run(
                [smi, "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            facts["nvidia_smi"] = query.stdout.strip()
    else:
        facts.update(device=None, arch=None)
    ctx.facts = facts
    record["details"].update(facts)
    ctx.log(json.dumps(facts, indent=2))
    if facts["cuda_available"]:
        _set(record, OK, f"{facts['device']}, cc {facts['capability']} -> arch {facts['arch']}, "
             f"torch {facts['torch']}, "
             f"transformers {facts['transformers']}, {facts['cpu_cores']} cores")  # fmt: skip
    elif ctx.dry_run:
        _set(record, OK, f"no GPU (dry run): torch {facts['torch']}, transformers {facts['transformers']}, "
             f"{facts['cpu_cores']} cores")  # fmt: skip
    else:
        _set(record, FAIL, "no CUDA device (torch.cuda.is_available() is False); run with --dry-run on a machine "
             "without a GPU")  # fmt: skip


def step_build(ctx: Context, record: dict) -> None:
    if ctx.source is None:
        _set(record, SKIPPED, "no vlfuse checkout found (pass --source); the installed vlfuse is checked as it is")
        return
    cmake = find_tool("cmake")
    if cmake is None:
        _set(record, FAIL, "cmake not found (pip install cmake)")
        return
    ninja = find_tool("ninja")
    pybind11 = subprocess.run([ctx.python, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True, timeout=60)
    if pybind11.returncode != 0:
        _set(record, FAIL, "pybind11 not importable by this Python (pip install pybind11)")
        return
    arch = ctx.facts.get("arch")
    build_dir = ctx.work / "build-configure" if ctx.dry_run else ctx.source / "build" / "gpu-check"
    configure = [cmake, "-S", str(ctx.source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release"]
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    configure += [
        f"-DPython_EXECUTABLE={ctx.python}",
        f"-Dpybind11_DIR={pybind11.stdout.strip()}",
        # a dry run configures the CPU build only (CUDA detection would double its time; `pip install` and
        # `make inplace` configure the CUDA build wherever a toolkit is present)
        f"-DVLFUSE_CUDA={'OFF' if ctx.dry_run else 'ON'}",
        "-DVLFUSE_SANITIZE=OFF",
    ]
    cxx, why = matching_compiler(ctx.python, os.environ.get("CXX"))
    ctx.log(f"# compiler: {why}")
    record["details"]["compiler"] = why
    if cxx:
        configure += [f"-DCMAKE_CXX_COMPILER={cxx}", f"-DCMAKE_CUDA_HOST_COMPILER={cxx}"]
    env = ctx.env(CMAKE_BUILD_PARALLEL_LEVEL=str(ctx.jobs), **({"TORCH_CUDA_ARCH_LIST": arch} if arch else {}))
    toolkit = _toolkit_on_path(ctx.facts.get("tools", {}).get("nvcc"))
    if toolkit and not any(env.get(k) for k in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")):
        env["CUDA_HOME"] = toolkit
    done = ctx.call(record, configure, env=env)
    cuda_line = re.search(r"vlfuse: (building CUDA kernels .*|building CPU kernels only.*)", done.output)
    record["details"].update(arch=arch, build_dir=str(build_dir), cmake=cuda_line.group(1) if cuda_line else None)
    if done.rc != 0 or done.timed_out:
        _set(record, FAIL, done.failure("cmake configure"))
        return
    if ctx.dry_run:
        _set(record, OK, f"configured the CPU build in {done.seconds:.0f} s; the CUDA build, its compile and the "
             "import check run on the GPU")  # fmt: skip
        return
    done = ctx.call(record, [cmake, "--build", str(build_dir), "-j", str(ctx.jobs)], env=env)
    if done.rc != 0 or done.timed_out:
        _set(record, FAIL, done.failure("build"))
        return
    built = sorted(build_dir.glob("_C*.so"))
    if not built:
        _set(record, FAIL, f"the build made no _C*.so in {build_dir}")
        return
    package = ctx.source / "python" / "vlfuse"
    staged = package / (built[0].name + ".partial")
    shutil.copy2(built[0], staged)
    os.replace(staged, package / built[0].name)  # a new inode: a process that has the old library mapped keeps it
    ctx.package_dir = package.parent
    done = ctx.call(record, [ctx.python, "-m", "vlfuse", "info", "--json"])
    info = _json_tail(done.output)
    record["details"]["build_info"] = info
    if done.rc != 0 or not info or not info.get("native_loaded"):
        _set(record, FAIL, done.failure("import of the built library"))
    elif not info.get("cuda_kernels") or arch not in info.get("cuda_archs", []):
        _set(record, FAIL, f"built without CUDA kernels for {arch}: {info.get('cuda_archs')}")
    elif "raised: vlfuse.merge2x2" not in (done := ctx.call(record, [ctx.python, "-c", ERROR_MESSAGE_CHECK])).output:
        _set(record, FAIL, done.failure("an argument error of the built library (it must raise, naming the op)")
             + f"; {why}")  # fmt: skip
    else:
        _set(record, OK, f"built for {arch} with {ctx.jobs} jobs; loads on {info.get('cuda_device') or 'no GPU'}")


def _toolkit_on_path(nvcc: str | None) -> str | None:
    """The toolkit of an nvcc found on PATH, for CMakeLists.txt, which looks in CUDA_HOME, CUDA_PATH and
    /usr/local/cuda only; None when that last one is there or the nvcc on PATH is a wrapper outside a toolkit."""
    if nvcc is None or os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        return None
    root = Path(os.path.realpath(nvcc)).parents[1]
    return str(root) if (root / "include" / "cuda_runtime.h").is_file() else None


def _json_tail(output: str) -> dict | None:
    """The last JSON object a command printed (its output may begin with warnings)."""
    start = output.rfind("\n{")
    start = 0 if start < 0 and output.lstrip().startswith("{") else start
    if start < 0:
        return None
    end = output.rfind("}")
    try:
        return json.loads(output[start : end + 1])
    except ValueError:
        return None


def _junit_counts(path: Path) -> dict | None:
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ][:50]
    return counts


def _pytest(ctx: Context, record: dict, argv_tail: list[str], junit: Path, what: str) -> dict | None:
    argv = [ctx.python, "-m", "pytest", *argv_tail, "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}"]
    done = ctx.call(record, argv)
    counts = _junit_counts(junit)
    record["details"]["pytest"] = counts
    if done.timed_out:
        _set(record, ERROR, done.failure(what) + (f" ({counts['passed']} passed before)" if counts else ""))
        return None
    if counts is None or done.rc not in (0, 1):
        _set(record, ERROR, done.failure(what))
        return None
    return counts


def step_pytest_cuda(ctx: Context, record: dict) -> None:
    if ctx.source is None:
        _set(record, SKIPPED, "no vlfuse checkout (the tests live in its tests/ folder)")
        return
    counts = _pytest(
        ctx, record, [str(ctx.source / "tests"), "-m", "cuda"], ctx.work / "pytest-cuda.xml", "pytest -m cuda"
    )
    if counts is None:
        return
    summary = f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if counts["failures"] or counts["errors"]:
        _set(record, FAIL, summary + ": " + ", ".join(counts["failed_tests"][:5]))
    elif ctx.dry_run or not ctx.facts.get("cuda_available"):
        _set(record, SKIPPED, f"{counts['tests']} CUDA tests collected, all skipped without a GPU")
    elif counts["passed"] == 0:
        _set(record, FAIL, "no CUDA test ran: " + summary)
    else:
        _set(record, OK, summary)


def _device(ctx: Context) -> str:
    return "cuda" if ctx.facts.get("cuda_available") and not ctx.dry_run else "cpu"


def _exercise_result(record: dict, path: Path) -> dict | None:
    result = _read_json(path)
    if result is not None:
        record["details"]["cases"] = len(result.get("cases", []))
        record["details"]["mismatches"] = [c for c in result.get("cases", []) if not c.get("ok")]
    return result


def step_exercise(ctx: Context, record: dict) -> None:
    path = ctx.work / "exercise.json"
    done = ctx.call(
        record, [ctx.python, "-m", "vlfuse.gpucheck.exercise", "--device", _device(ctx), "--json", str(path)]
    )
    result = _exercise_result(record, path)
    if done.rc != 0 or done.timed_out or result is None:
        _set(record, ERROR if result is None or done.timed_out else FAIL, done.failure("exercise"))
        return
    bad = record["details"]["mismatches"]
    if bad:
        _set(record, FAIL, f"{len(bad)} of {len(result['cases'])} calls disagree with vlfuse.reference: "
             + ", ".join(c["name"] for c in bad[:4]))  # fmt: skip
    else:
        _set(record, OK, f"{len(result['cases'])} op calls (forward and backward) on {_device(ctx)} agree with "
             "vlfuse.reference")  # fmt: skip


SANITIZER_INTERNAL = "Internal Sanitizer Error"
# racecheck cannot follow cuBLAS's Hopper GEMM kernels ("Internal Sanitizer Error: The Sanitizer failed to handle a
# hardware exception", then CUBLAS_STATUS_EXECUTION_FAILED) even when told to check vlfuse's kernels alone. The
# patch_embed calls are a cuBLAS GEMM and nothing else, and embed_frames' own kernel is patchify's, which it checks.
SANITIZER_SKIPS = {"racecheck": ("patch_embed", "embed_frames")}
SANITIZER_REPORT = re.compile(r"^=+ (Invalid |Error: |Warning: Race|Barrier error)", re.MULTILINE)
SANITIZER_SUMMARY = re.compile(
    r"(ERROR SUMMARY: (\d+) errors?|RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?)"
)


def sanitizer_errors(output: str) -> int | None:
    """The most errors any of compute-sanitizer's summary lines reports; None when it printed none."""
    found = SANITIZER_SUMMARY.findall(output)
    return max(int(errors or race_errors or 0) for _, errors, _, race_errors in found) if found else None


def _sanitizer_step(tool: str) -> Callable[[Context, dict], None]:
    def run(ctx: Context, record: dict) -> None:
        sanitizer = find_tool("compute-sanitizer")
        path = ctx.work / f"exercise-{tool}.json"
        argv = [
            sanitizer or "compute-sanitizer",
            "--tool", tool,
            "--kernel-name", SANITIZER_KERNELS,
            "--error-exitcode", "99",
            "--report-api-errors", "no",
            "--print-limit", "20",
            ctx.python, "-m", "vlfuse.gpucheck.exercise", "--device", "cuda", "--json", str(path),
        ]  # fmt: skip
        argv += [a for prefix in SANITIZER_SKIPS.get(tool, ()) for a in ("--skip", prefix)]
        if ctx.dry_run or not ctx.facts.get("cuda_available"):
            record["commands"].append(" ".join(_quote(a) for a in argv))
            _set(record, SKIPPED, "needs a GPU (the script it runs is the exercise step's)")
            return
        if sanitizer is None:
            _set(record, SKIPPED, "compute-sanitizer not found (CUDA toolkit bin/ or PATH): NOT CHECKED")
            return
        # without the caching allocator every tensor is its own allocation, so memcheck sees its true bounds
        env = ctx.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1") if tool == "memcheck" else ctx.env()
        done = ctx.call(record, argv, env=env)
        errors = sanitizer_errors(done.output)
        result = _exercise_result(record, path)
        record["details"].update(errors=errors, kernels=SANITIZER_KERNELS)
        reported = SANITIZER_REPORT.findall(done.output)
        if done.timed_out and not reported:  # inconclusive, not a finding: shown, but not failing the check
            _set(record, WARN, done.failure(tool) + f"; no {tool} error reported before (incomplete)")
        elif done.timed_out:
            _set(record, FAIL, done.failure(tool) + f" after {len(reported)} {tool} report(s) (see the log)")
        elif SANITIZER_INTERNAL in done.output:
            _set(record, ERROR, f"compute-sanitizer's {tool} broke down itself ('{SANITIZER_INTERNAL}'), see the log")
        elif done.rc == 99 or (errors or 0) > 0:
            _set(record, FAIL, f"{errors} {tool} error(s) in vlfuse kernels (see the log)")
        elif done.rc != 0 or result is None:
            _set(record, ERROR, done.failure(f"the exercise under {tool}"))
        else:
            _set(record, OK, f"0 errors over {len(result['cases'])} op calls ({SANITIZER_KERNELS})")

    return run


def _ncu_rows(text: str) -> list[dict]:
    """Kernels (one dict each: name, then metric -> number) from ncu's --csv details output."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        if not row.get("Metric Name"):
            continue
        kernel = kernels.setdefault(row["ID"], {"name": _short_kernel_name(row.get("Kernel Name", ""))})
        try:
            kernel[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
        except (ValueError, AttributeError):
            kernel[row["Metric Name"]] = row["Metric Value"]
    return list(kernels.values())


def _short_kernel_name(name: str) -> str:
    """vlfuse::merge::(anonymous namespace)::backward_kernel<c10::BFloat16, ...>(...) -> merge::backward_kernel<...>"""
    name = name.replace("(anonymous namespace)::", "").replace("vlfuse::", "")
    base = name.split("(")[0]
    return re.sub(r"<(.{60}).*>$", r"<\1...>", base)


def step_ncu(ctx: Context, record: dict) -> None:
    workload = [ctx.python, "-m", "vlfuse.gpucheck.exercise", "--profile", "--device", _device(ctx)]
    if ctx.dry_run or not ctx.facts.get("cuda_available"):
        done = ctx.call(record, workload + ["--tiny"])
        if done.rc != 0 or done.timed_out:
            _set(record, ERROR, done.failure("the profiled workload (tiny, CPU)"))
        else:
            _set(record, SKIPPED, "needs a GPU (its workload ran at tiny sizes on the CPU)")
        return
    ncu = find_tool("ncu")
    if ncu is None:
        _set(record, SKIPPED, "ncu (Nsight Compute) not found")
        return
    rows: list[dict] = []
    for metrics in (NCU_METRICS, NCU_CORE_METRICS):
        csv_path = ctx.work / "ncu.csv"
        argv = [
            ncu, "--clock-control", "none", "--kernel-name-base", "demangled", "--kernel-name", NCU_KERNELS,
            "--launch-count", "24", "--metrics", ",".join(metrics), "--csv", "--log-file", str(csv_path), *workload,
        ]  # fmt: skip
        done = ctx.call(record, argv)
        text = csv_path.read_text() if csv_path.exists() else ""
        ctx.log(text)
        rows = _ncu_rows(text)
        if rows or done.timed_out:
            break
    record["details"]["kernels"] = rows
    if not rows:
        _set(record, ERROR, done.failure("ncu"))
        return
    merge_bwd = [r for r in rows if "merge::backward" in r["name"]]
    focus = merge_bwd[0] if merge_bwd else rows[0]
    conflicts = sum(focus.get(f"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{op}.sum", 0) for op in ("ld", "st"))
    wavefronts = sum(focus.get(f"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{op}.sum", 0) for op in ("ld", "st"))
    dram = focus.get("dram__throughput.avg.pct_of_peak_sustained_elapsed")
    _set(record, OK if not done.timed_out else WARN,
         f"{len(rows)} kernels profiled; {focus['name']}: DRAM {dram}% of peak, shared-memory bank conflicts "
         f"{conflicts:.0f} of {wavefronts:.0f} wavefronts")  # fmt: skip


def _bench_step(group: str) -> Callable[[Context, dict], None]:
    def run(ctx: Context, record: dict) -> None:
        path = ctx.work / f"bench-{group}.json"
        argv = [ctx.python, "-m", "vlfuse.gpucheck.bench", group, "--device", _device(ctx), "--json", str(path)]
        if _device(ctx) == "cpu":
            argv.append("--tiny")
        done = ctx.call(record, argv)
        report = _read_json(path)
        records = report["results"] if report else []
        record["details"]["machine"] = report["machine"] if report else None
        record["details"]["results"] = records
        bad = [r for r in records if (r.get("check") or "").startswith(("FAIL", "error"))]
        timed = [r for r in records if r.get("vlfuse_ms") is not None]
        where = "tiny sizes on the CPU, no torch.compile" if _device(ctx) == "cpu" else "CUDA"
        if bad:
            _set(record, FAIL, f"{len(bad)} case(s) disagree with HF: " + ", ".join(_case_id(r) for r in bad[:3]))
        elif done.timed_out:  # what ran was checked and timed; the rest is speed not measured, not a failure
            _set(record, WARN, done.failure(f"bench {group}") + f" ({len(timed)} of {len(records)} cases timed before)")
        elif done.rc != 0 or report is None:
            _set(record, ERROR, done.failure(f"bench {group}"))
        else:
            _set(record, OK, f"{len(timed)} of {len(records)} cases checked and timed ({where})")

    return run


def _case_id(r: dict) -> str:
    return f"{r['op']}/{r['case']}/{r['dtype']}/{r['pass']}"


def step_cuda_graph(ctx: Context, record: dict) -> None:
    path = ctx.work / "cuda-graph.json"
    argv = [ctx.python, "-m", "vlfuse.gpucheck.graph", "--device", _device(ctx), "--json", str(path)]
    if _device(ctx) == "cpu":
        argv.append("--tiny")
    done = ctx.call(record, argv)
    result = _read_json(path)
    record["details"].update(result or {})
    if result is None or done.timed_out:
        _set(record, ERROR, done.failure("cuda-graph"))
    elif _device(ctx) == "cpu":
        _set(record, SKIPPED, "needs a GPU (the tower it captures ran eagerly on the CPU)")
    elif not result.get("captured"):
        _set(record, WARN, "not capturable yet: " + result.get("reason", "?"))
    elif not result.get("replay_matches"):
        _set(record, FAIL, f"replay differs from the eager tower (max relative error {result.get('max_err')})")
    else:
        _set(record, OK, f"captured ({result['form']}); replay {result['replay_ms']:.3f} ms vs eager "
             f"{result['eager_ms']:.3f} ms")  # fmt: skip


STATIC_TEST = "tests/test_cuda_static.py"


def step_static(ctx: Context, record: dict) -> None:
    test = ctx.source / STATIC_TEST if ctx.source else None
    if test is None or not test.exists():
        _set(record, SKIPPED, f"{STATIC_TEST} is not in this checkout")
        return
    if ctx.dry_run:
        done = ctx.call(
            record, [ctx.python, "-m", "pytest", str(test), "--collect-only", "-q", "-p", "no:cacheprovider"]
        )
        collected = re.search(r"(\d+) tests? collected", done.output)
        if done.rc != 0 or collected is None:
            _set(record, ERROR, done.failure(f"collecting {STATIC_TEST}"))
        else:
            _set(record, SKIPPED, f"{collected.group(1)} tests collected; they run in `make test` (ptxas needs no GPU)")
        return
    counts = _pytest(ctx, record, [str(test), "-rA"], ctx.work / "static.xml", STATIC_TEST)
    if counts is None:
        return
    if counts["failures"] or counts["errors"]:
        _set(record, FAIL, f"{counts['failures'] + counts['errors']} failed: " + ", ".join(counts["failed_tests"][:4]))
    else:
        _set(record, OK, f"{counts['passed']} passed, {counts['skipped']} skipped (ptxas figures in the log)")


STEPS = (
    Step("environment", "GPU, toolkit and versions", step_environment, 60, 60, gate=True, needs_build=False),
    Step("build", "in-place build for this GPU's arch", step_build, 240, 90, gate=True, needs_build=False),
    Step("pytest-cuda", "pytest -m cuda (parity vs CPU reference and HF)", step_pytest_cuda, 180, 90, gate=True),
    Step("exercise", "every op fwd+bwd on small odd shapes", step_exercise, 60, 60, gate=True),
    Step("memcheck", "compute-sanitizer memcheck", _sanitizer_step("memcheck"), 100, 10, gate=True),
    Step("racecheck", "compute-sanitizer racecheck", _sanitizer_step("racecheck"), 100, 10, gate=True),
    Step("synccheck", "compute-sanitizer synccheck", _sanitizer_step("synccheck"), 60, 10, gate=True),
    Step("ncu", "Nsight Compute: DRAM and shared-memory banks", step_ncu, 90, 60),
    Step("cuda-graph", "CUDA-graph capture + replay of the tower", step_cuda_graph, 60, 60),
    Step("bench-ops", "ops vs HF eager / torch.compile / copy or GEMM", _bench_step("ops"), 150, 90, gate=True),
    Step("bench-tower", "vision tower depth 8 bf16 vs HF", _bench_step("tower"), 150, 90, gate=True),
    Step("static", "ptxas resources (tests/test_cuda_static.py)", step_static, 120, 60, needs_build=False),
)


# ---- the driver --------------------------------------------------------------------------------------------


def _write_report(ctx: Context, report: dict) -> None:
    staged = ctx.out / "gpu-check.json.partial"
    staged.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(staged, ctx.out / "gpu-check.json")


def _bench_report(ctx: Context, records: list[dict]) -> None:
    """bench-ops and bench-tower in the `vlfuse bench` JSON format, named after the device, beside the check."""
    parts = [r for r in records if r["name"].startswith("bench-") and r["details"].get("machine")]
    if not parts:
        return
    machine = dict(parts[0]["details"]["machine"])
    results = [row for r in parts for row in r["details"]["results"]]
    slug = machine.get("slug", "device")
    (ctx.out / f"bench-{slug}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


def run_check(
    out: str,
    dry_run: bool = False,
    source: str | None = None,
    budget_s: float | None = None,
    only: list[str] | None = None,
    jobs: int | None = None,
) -> int:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = budget_s if budget_s is not None else DEFAULT_BUDGET_S
    began = time.monotonic()
    ctx = Context(
        out=out_dir,
        work=Path(tempfile.mkdtemp(prefix="vlfuse-gpu-check-")),
        source=find_source(source),
        dry_run=dry_run,
        jobs=jobs or os.cpu_count() or 1,
        deadline=began + budget,
        log_path=out_dir / "gpu-check.log",
    )
    ctx.log_path.write_text(
        f"vlfuse gpu-check{' --dry-run' if dry_run else ''}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n"
    )
    records = [
        {"name": s.name, "title": s.title, "gate": s.gate, "status": PENDING, "summary": "", "seconds": None,
         "time_box_s": s.dry_box_s if dry_run else s.box_s, "commands": [], "details": {}}
        for s in STEPS
    ]  # fmt: skip
    report = {
        "dry_run": dry_run,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "budget_s": budget,
        "source": str(ctx.source) if ctx.source else None,
        "steps": records,
        "verdict": None,
    }
    _write_report(ctx, report)
    blocked = None  # the failed environment or build step that the remaining steps cannot run without
    for step, record in zip(STEPS, records):
        left = ctx.deadline - time.monotonic()
        if only and step.name not in only and step.name not in ("environment", "build"):
            _set(record, SKIPPED, "not selected (--steps)")
        elif blocked == "environment" or (blocked and step.needs_build):
            _set(record, SKIPPED, f"the {blocked} step failed")
        elif left < MIN_STEP_S:
            _set(record, SKIPPED, f"out of the {budget:.0f} s budget")
        else:
            ctx.step_deadline = time.monotonic() + min(record["time_box_s"], left)
            ctx.log(f"\n===== {step.name}: {step.title} =====")
            print(f"[gpu-check] {step.name}: {step.title} ...", flush=True)
            started = time.monotonic()
            try:
                step.run(ctx, record)
            except Exception as exc:  # a broken step is reported, and the others still run
                ctx.log(traceback.format_exc())
                _set(record, ERROR, f"{type(exc).__name__}: {exc}")
            record["seconds"] = round(time.monotonic() - started, 1)
            if step.name in ("environment", "build") and record["status"] in (FAIL, ERROR):
                blocked = step.name
        print(f"[gpu-check] {step.name}: {record['status']}: {record['summary']}", flush=True)
        _write_report(ctx, report)
    failed = [r["name"] for r in records if r["gate"] and r["status"] in (FAIL, ERROR)]
    report["verdict"] = "FAIL: " + ", ".join(failed) if failed else "pass"
    report["seconds"] = round(time.monotonic() - began, 1)
    _write_report(ctx, report)
    _bench_report(ctx, records)
    table = format_summary(report)
    ctx.log("\n" + table)
    print("\n" + table, flush=True)
    shutil.rmtree(ctx.work, ignore_errors=True)
    return 1 if failed else 0


def format_summary(report: dict) -> str:
    rows = [("step", "status", "s", "summary")]
    for r in report["steps"]:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        rows.append(
            (r["name"], r["status"].upper() if r["status"] in (FAIL, ERROR) else r["status"], seconds, r["summary"])
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
    for r in report["steps"]:
        if r["name"].startswith("bench-") and r["details"].get("results"):
            width = max(len(_case_id(row)) for row in r["details"]["results"])
            lines += ["", f"{r['name']}:"] + [_bench_line(row, width) for row in r["details"]["results"]]
        if r["name"] == "ncu" and r["details"].get("kernels"):
            lines += ["", "ncu (per kernel):"] + [_ncu_line(k) for k in r["details"]["kernels"]]
    mode = "dry run (no GPU)" if report["dry_run"] else "GPU run"
    lines += ["", f"gpu-check {mode}: {report['verdict']} in {report['seconds']:.0f} s"]
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _bench_line(r: dict, width: int) -> str:
    check = r.get("check") or ""
    head = f"  {_case_id(r):<{width}}  {check[:40]:<4}"
    if r.get("vlfuse_ms") is None:
        return head
    unit = (r.get("rate_unit") or "").replace("TFLOP/s", "TF/s")
    limit = "copy" if r.get("limit_kind") == "bandwidth" else "GEMM"
    return (
        f"{head} {_fmt(r['vlfuse_ms'], '.3f')} ms  {_fmt(r.get('speedup_eager'), '.2f')}x eager  "
        f"{_fmt(r.get('speedup_compile'), '.2f')}x compile  {_fmt(r.get('vlfuse_rate'), '.1f')} {unit}  "
        f"{_fmt(r.get('pct_of_limit'), '.0f')}% {limit}"
    )


def _ncu_line(k: dict) -> str:
    def get(metric):
        return k.get(metric) if isinstance(k.get(metric), float) else None

    moved = (get("dram__bytes_read.sum") or 0) + (get("dram__bytes_write.sum") or 0)
    ns = get("gpu__time_duration.sum")
    rate = moved / ns if ns else None  # bytes per ns = GB/s
    conflicts = [get(f"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_{op}.sum") for op in ("ld", "st")]
    waves = [get(f"l1tex__data_pipe_lsu_wavefronts_mem_shared_op_{op}.sum") for op in ("ld", "st")]
    return (
        f"  {k['name'][:70]:<70} {_fmt(ns and ns / 1e3, '.1f')} us  DRAM {_fmt(rate, '.0f')} GB/s "
        f"({_fmt(get('dram__throughput.avg.pct_of_peak_sustained_elapsed'), '.0f')}% peak)  smem conflicts "
        f"ld {_fmt(conflicts[0], '.0f')}/{_fmt(waves[0], '.0f')} st {_fmt(conflicts[1], '.0f')}/{_fmt(waves[1], '.0f')}"
    )

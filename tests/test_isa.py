"""Every CPU build of the kernels gives the results the op tests demand, not just the one this CPU runs best.

One process only ever runs the best build its CPU supports (vlfuse.build_info()["cpu_isa"]), so the kernel tests
are rerun in a subprocess capped at each lower build this CPU can still execute, through ATEN_CPU_CAPABILITY
(which caps ATen's own kernels the same way): an AVX-512 machine checks the AVX2 and baseline code too, and an
AVX512_BF16 machine the plain AVX-512 build as well.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vlfuse

# Lowest first; the cap that selects each (AVX512_BF16, the widest, runs only uncapped).
ISAS = ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")
CAP = {"DEFAULT": "default", "AVX2": "avx2", "AVX512": "avx512"}
# The compile tests are left out: they check fake kernels and graph breaks, which no ISA changes, and inductor's
# own generated C++ is unreliable on the AVX-512 CPU this was written on (torch 2.14.1): the compiled backward of
# a plain (x @ w.t()).square().sum() gives wrong values and corrupts the heap without vlfuse, and test_patchify's
# inductor test gives NaN under ATEN_CPU_CAPABILITY=avx2 while its aot_eager twin is exact.
KERNEL_TESTS = (
    "test_rope.py", "test_merge.py", "test_patchify.py", "test_pos_embed.py", "test_linear_act.py", "test_large.py",
    "test_fuzz.py", "test_attention.py",
)
HERE = Path(__file__).resolve().parent


def _lower_builds() -> list[str]:
    info = vlfuse.build_info()
    best = info["cpu_isa"]
    return [isa for isa in ISAS[: ISAS.index(best)] if isa in info["cpu_isas_built"]]


def _capped_env(isa: str) -> dict[str, str]:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=CAP[isa])
    # the subprocess imports the same vlfuse as this one
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(vlfuse.__file__).parents[1]), env.get("PYTHONPATH")) if p)
    return env


def test_best_build_is_chosen_and_listed():
    info = vlfuse.build_info()
    assert info["cpu_isa"] in ISAS
    assert info["cpu_isa"] in info["cpu_isas_built"]


@pytest.mark.parametrize("isa", CAP)
def test_kernel_tests_pass_on_each_lower_build(isa):
    if isa not in _lower_builds():
        pytest.skip(f"{isa} is not a build below this CPU's best ({vlfuse.build_info()['cpu_isa']})")
    env = _capped_env(isa)
    probe = subprocess.run(
        [sys.executable, "-c", "import vlfuse; print(vlfuse.build_info()['cpu_isa'])"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == isa, f"ATEN_CPU_CAPABILITY={CAP[isa]} selected {probe.stdout.strip()}"
    files = [str(HERE / name) for name in KERNEL_TESTS if (HERE / name).exists()]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda", "-k", "not compile",
         *files],
        env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=1800,
    )
    assert run.returncode == 0, f"kernel tests on the {isa} build failed:\n{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]

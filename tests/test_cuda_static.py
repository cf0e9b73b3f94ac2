"""Static checks of the CUDA kernels, for machines without a GPU: each csrc/*/*_cuda.cu is compiled for sm_90a
(device code only, as the build compiles it) and ptxas's resource report and the SASS are read for facts that
decide speed or correctness on the GPU: no spills, registers within a bound per kernel (occupancy), 16-byte
stores in rope, no 64-bit integer division in patchify, and merge's weight/bias accumulators addressed as shared
memory (generic loads and stores there meant bank-conflicted, uncached round trips). Runs wherever nvcc is, as
in CI; skips elsewhere."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "merge": "csrc/merge/merge_cuda.cu",
    "rope": "csrc/rope/rope_cuda.cu",
    "patchify": "csrc/patchify/patchify_cuda.cu",
    "pos_embed": "csrc/pos_embed/pos_embed_cuda.cu",
    "linear_act": "csrc/linear_act/linear_act_cuda.cu",
}
ARCH = "sm_90a"


def _nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuobjdump(nvcc: str) -> str | None:
    beside = Path(nvcc).resolve().parent / "cuobjdump"
    if beside.exists():
        return str(beside)
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    # A toolkit without it (a minimal install) still has torch's triton, which ships one.
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (CUDA_HOME, /usr/local/cuda or PATH): these static checks need the CUDA toolkit"
)


def _compile_flags() -> list[str]:
    includes = [f"-I{ROOT / 'csrc'}"]
    for path in cpp_extension.include_paths():
        includes += ["-isystem", path]
    for sp in site.getsitepackages():
        nvidia = Path(sp) / "nvidia" / "cu13" / "include"
        if nvidia.is_dir():
            includes += ["-isystem", str(nvidia)]
    # The flags CMakeLists.txt gives the CUDA sources, for one architecture and device code only.
    return [
        "-cubin", f"-arch={ARCH}", "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v",
        "-DVLFUSE_WITH_CUDA", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", *includes,
    ]  # fmt: skip


def _demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = []
    for name in out.splitlines():
        name = re.sub(r"vlfuse::\w+::\(anonymous namespace\)::", "", name)
        name = name.replace("c10::BFloat16", "bf16").replace("c10::Half", "fp16")
        short.append(re.sub(r"\([^()]*\)$", "", name).removeprefix("void "))
    return short


def _resources(ptxas_log: str) -> dict[str, dict[str, int]]:
    """Kernel -> registers, stack frame and spill bytes, from ptxas -v."""
    entries = re.findall(r"Compiling entry function '([^']+)'(.*?)(?=Compiling entry function|\Z)", ptxas_log, re.S)
    kernels = {}
    for name, (_, body) in zip(_demangle([e[0] for e in entries]), entries):
        stack = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
        kernels[name] = {
            "registers": int(re.search(r"Used (\d+) registers", body).group(1)),
            "stack": int(stack.group(1)),
            "spills": int(stack.group(2)) + int(stack.group(3)),
        }
    return kernels


def _sass(text: str) -> dict[str, Counter]:
    """Kernel -> count of each SASS opcode (with its modifiers, e.g. STG.E.128)."""
    mangled, opcodes = [], []
    for line in text.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            mangled.append(header.group(1))
            opcodes.append(Counter())
            continue
        instr = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if instr and opcodes:
            opcodes[-1][instr.group(1)] += 1
    return dict(zip(_demangle(mangled), opcodes))


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """module -> (kernel resources, kernel SASS opcode counts or None without cuobjdump), compiled once."""
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt (binutils) not found: kernel names cannot be read")
    out = tmp_path_factory.mktemp("cuda_static")
    flags = _compile_flags()
    cuobjdump = _cuobjdump(NVCC)

    def build(module: str):
        cubin = out / f"{module}.cubin"
        command = [NVCC, *flags, "-o", str(cubin), str(ROOT / SOURCES[module])]
        run = subprocess.run(command, capture_output=True, text=True)
        assert run.returncode == 0, f"nvcc failed on {SOURCES[module]}:\n{run.stderr[-4000:]}"
        sass = None
        if cuobjdump is not None:
            dump = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True)
            sass = _sass(dump.stdout)
        return module, (_resources(run.stderr + run.stdout), sass)

    # Two compilers at a time: the project's machines have two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(build, SOURCES))


def _sass_of(compiled, module: str) -> dict[str, Counter]:
    sass = compiled[module][1]
    if sass is None:
        pytest.skip("cuobjdump not found (beside nvcc, on PATH, or in triton): SASS cannot be read")
    return sass


def _kernels(compiled, module: str, pattern: str) -> dict:
    found = {name: v for name, v in _sass_of(compiled, module).items() if re.search(pattern, name)}
    assert found, f"no {module} kernel matches {pattern!r}"
    return found


# Register bounds per kernel (name pattern, first match wins), a little above what nvcc 13.0 allocates, so a
# regression fails while compiler noise does not. On sm_90 (64K registers, 2048 threads per SM), registers a
# thread -> warps resident per SM: 32 -> 64, 40 -> 48, 48 -> 40, 64 -> 32, 96 -> 20, 128 -> 16, 168 -> 12.
# merge's kernels hold kLoads 16-byte packs of each row per lane (the third template argument; the last is
# kPostshuffle) and grow with it; at Qwen2-VL's C = 1280 the backward (bf16: 5 packs, 96 registers) is held to
# 16 warps by its shared memory anyway.
REGISTER_BOUNDS = {
    "merge": [
        (r"^forward_kernel<[^,]+, \d+, (16|12), ", 112),
        (r"^forward_kernel<", 80),
        (r"^backward_kernel<[^,]+, \d+, (12|10), ", 176),
        (r"^backward_kernel<[^,]+, \d+, (8|6), ", 128),
        (r"^backward_kernel<", 104),
        (r"", 48),
    ],
    "rope": [(r"", 64)],
    "patchify": [(r"", 48)],
    "pos_embed": [(r"^forward_kernel<", 64), (r"^backward_kernel<", 56), (r"", 48)],
    "linear_act": [(r"", 64)],
}


@pytest.mark.parametrize("module", SOURCES)
def test_no_spills_and_no_local_memory(compiled, module):
    resources = compiled[module][0]
    assert resources, f"ptxas reported no kernels for {SOURCES[module]}"
    for name, r in resources.items():
        assert r["spills"] == 0, f"{name} spills {r['spills']} bytes"
        # rope's angle kernels (positions and freqs) compute sincos, whose reduction of huge angles keeps its
        # digits in a local array: that frame and nothing else.
        angle_kernel = module == "rope" and re.search(r"rope_kernel<[^,]+, [^,]+, false,", name)
        limit = (80 if "double" in name else 32) if angle_kernel else 0
        assert r["stack"] <= limit, f"{name} uses {r['stack']} bytes of local memory (at most {limit})"


@pytest.mark.parametrize("module", SOURCES)
def test_register_counts_within_bounds(compiled, module):
    for name, r in compiled[module][0].items():
        bound = next(b for pattern, b in REGISTER_BOUNDS[module] if re.search(pattern, name))
        assert r["registers"] <= bound, f"{name} uses {r['registers']} registers (bound {bound})"


ELEMENT_BYTES = {"float": 4, "double": 8, "bf16": 2, "fp16": 2}


def test_rope_vector_kernels_store_whole_packs_at_once(compiled):
    # Both halves of every rotated pack (out_lo, out_hi) and the copied v are single stores of the whole pack
    # (16 bytes, or 8 for the half-width packs of head_dim 72 in bf16); a narrower global store there means a
    # pack was split into element stores. The coefficients come as 16-byte loads.
    for name, ops in _kernels(compiled, "rope", r"rope_kernel<.*, ([248])>$").items():
        scalar, vec = re.match(r"rope_kernel<(\w+), .*, (\d+)>$", name).groups()
        store = {16: "STG.E.128", 8: "STG.E.64"}[ELEMENT_BYTES[scalar] * int(vec)]
        stores = {op: n for op, n in ops.items() if op.startswith("STG")}
        assert set(stores) == {store} and stores[store] >= 3, f"{name}: global stores {stores}"
        shared_loads = {op: n for op, n in ops.items() if op.startswith("LDS")}
        assert set(shared_loads) == {"LDS.128"}, f"{name}: shared loads {shared_loads}"


def test_patchify_has_no_64_bit_division(compiled):
    # nvcc emits a 64-bit integer division as a call to a subroutine built around I2F.U64.RP.
    for name, ops in _kernels(compiled, "patchify", r"^patchify_kernel<").items():
        calls = sum(n for op, n in ops.items() if op.startswith("CALL"))
        assert calls == 0 and ops["I2F.U64.RP"] == 0, f"{name}: {calls} calls, {ops['I2F.U64.RP']} I2F.U64.RP"


def test_merge_accumulates_in_shared_memory(compiled):
    kernels = _kernels(compiled, "merge", r"")
    for name, ops in kernels.items():
        generic = {op: n for op, n in ops.items() if re.match(r"(LD|ST)\.", op)}
        assert not generic, f"{name}: generic loads/stores {generic}"
    for name, ops in _kernels(compiled, "merge", r"^backward_kernel<[^,]+, \d+, \d+, true, ").items():
        assert any(op.startswith("LDS") for op in ops) and any(op.startswith("STS") for op in ops), name


def test_pos_embed_kernels_call_no_subroutine_and_store_16_bytes(compiled):
    # A 64-bit integer division, or the float division's slow path, is a subroutine call: the registers saved
    # around it spilled in the backward's loops (pos_embed.h spells out the division's fast path instead).
    for name, ops in _kernels(compiled, "pos_embed", r"^(forward|backward)_kernel<").items():
        calls = sum(n for op, n in ops.items() if op.startswith("CALL"))
        assert calls == 0 and ops["I2F.U64.RP"] == 0, f"{name}: {calls} calls, {ops['I2F.U64.RP']} I2F.U64.RP"
    for name, ops in _kernels(compiled, "pos_embed", r"^(forward|backward)_kernel<[^,]+, [248]>$").items():
        stores = {op for op in ops if op.startswith("STG")}
        assert stores == {"STG.E.128"}, f"{name}: global stores {stores}"


def test_linear_act_epilogue_moves_whole_packs(compiled):
    # The packed epilogue (16 bytes of the output type per thread) loads and stores each pack in one access.
    for name, ops in _kernels(compiled, "linear_act", r"^epilogue_kernel<.*, (2|4|8)>$").items():
        stores = {op for op in ops if op.startswith("STG")}
        assert stores == {"STG.E.128"}, f"{name}: global stores {stores}"

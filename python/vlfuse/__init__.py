"""vlfuse: fused kernels for the vision path of Qwen2-VL-style models, and a model package built on them.

Importing vlfuse loads the native library (``vlfuse._C``), which registers the operators under
``torch.ops.vlfuse``; the public functions live in :mod:`vlfuse.ops`.
"""

from __future__ import annotations

import platform

import torch

from ._native import NATIVE_ERROR, native, require_native

__version__ = "0.1.0"

if native is not None:  # ops register their fake kernels and autograd against the loaded library's schemas
    from . import ops  # noqa: E402


def build_info() -> dict:
    """How vlfuse was built and what it runs on: versions, CUDA kernels and archs, the CPU vector ISA in use."""
    info = {
        "vlfuse": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "native_loaded": native is not None,
    }
    if native is None:
        info["native_error"] = NATIVE_ERROR
        return info
    built = native.build_info()
    info.update(
        {
            "cuda_kernels": bool(built["cuda"]),
            "cuda_archs": [a for a in built["cuda_archs"].split(",") if a],
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cpu_isa": built["cpu_isa"],
            "cpu_isas_built": built["cpu_isas_built"].split(","),
            "cpu_openmp": bool(built["cpu_openmp"]),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "compiler": built.get("compiler"),
        }
    )
    return info


def output_cache_stats() -> dict:
    """Counters of the CPU output block cache: the ops keep freed output blocks of 1 MiB or more (up to
    ``limit_bytes``, env ``VLFUSE_CPU_OUTPUT_CACHE_MB``, default 1024) and hand them to later outputs, whose pages
    are then already mapped (see csrc/common/cpu_memory.h). Keys: limit_bytes, cached_bytes, cached_blocks, live_bytes,
    reused, mapped, released."""
    require_native()
    return dict(native.output_cache_stats())


def empty_output_cache() -> None:
    """Returns every kept CPU output block to the system (as ``torch.cuda.empty_cache`` does on CUDA)."""
    require_native()
    native.empty_output_cache()


def set_output_cache_limit(nbytes: int) -> None:
    """Keeps at most ``nbytes`` of freed CPU output blocks for reuse (0: none), releasing the oldest over it."""
    require_native()
    native.set_output_cache_limit(int(nbytes))


__all__ = [
    "build_info",
    "empty_output_cache",
    "ops",
    "output_cache_stats",
    "set_output_cache_limit",
    "__version__",
]

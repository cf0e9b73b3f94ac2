"""The machine a run measures: its name, threads and versions, and its limits measured in the same run
(copy bandwidth and GEMM throughput), plus the per-case limit references the runner times alongside each case."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch

from .timing import TimingConfig, time_interleaved


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_signature() -> dict:
    """The CPU's family and model numbers from /proc/cpuinfo (empty elsewhere): a VM's model name ("AMD EPYC")
    says nothing of the core generation (family 25 model 17 is Zen 4, family 26 Zen 5), whose figures differ."""
    found = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model") and key.replace(" ", "_") not in found:
                    found[key.replace(" ", "_")] = int(value)
                if not line.strip():
                    break
    except (OSError, ValueError):
        return {}
    return {"cpu_family": found["cpu_family"], "cpu_model": found["model"]} if len(found) == 2 else {}


def _slug_words(text: str) -> list[str]:
    keep = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return [w for w in keep.split("-") if w and w not in {"r", "tm", "processor", "cpu", "with", "core", "80gb", "hbm3"}]


def device_slug(device: torch.device) -> str:
    """A file-name-safe name for benchmarks/results/<slug>.json, e.g. "cpu-amd-epyc-f25m17-avx512-bf16" or
    "cuda-nvidia-h100". A VM's CPU model name ("AMD EPYC") can stand for several core generations, with and
    without AVX-512, whose figures differ: a CPU's slug adds its family and model numbers where /proc/cpuinfo
    has them, and ends in the vlfuse build it ran."""
    words = _slug_words(device_name(device))[:4]
    if device.type == "cpu":
        import vlfuse

        signature = cpu_signature()
        if signature:
            words.append(f"f{signature['cpu_family']}m{signature['cpu_model']}")
        words += _slug_words(str(vlfuse.build_info().get("cpu_isa") or ""))
    return "-".join([device.type] + words)


def copy_reference(nbytes: float, device: torch.device) -> Callable[[], torch.Tensor]:
    """A copy that moves `nbytes` in all (reads nbytes/2, writes nbytes/2): the bandwidth limit for a
    memory-bound op that moves as many bytes, measured on a buffer of the same size because caches matter."""
    count = max(1, int(nbytes // 2) // 4)
    source = torch.rand(count, device=device)
    destination = torch.empty_like(source)
    return lambda: destination.copy_(source)


def machine_info(device: torch.device, measure_limits: bool, quick: bool) -> dict:
    import vlfuse

    info = {
        "device": device_name(device),
        "device_type": device.type,
        "slug": device_slug(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vlfuse": vlfuse.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cpu":
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["vlfuse_cpu_isa"] = vlfuse.build_info().get("cpu_isa")
        info.update(cpu_signature())
    if measure_limits:
        info.update(measure_machine_limits(device, quick))
    return info


def measure_machine_limits(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth for a buffer larger than the caches, and square-GEMM throughput per dtype in nn.Linear's layout
    (x @ W^T), the layout of every GEMM the towers run: where a CPU has no native kernel for a reduced type, ATen's
    fallback for that layout can be an order of magnitude faster than for a plain mm, and the runner's estimate of
    a slow case's time must not come from the wrong one."""
    config = TimingConfig(warmup=1, repeats=3 if quick else 5, min_sample_s=0.02)
    copy_bytes = (64 if quick else 256) * 2**20
    n = 512 if quick else 1024
    fns: dict[str, Callable[[], object]] = {"copy": copy_reference(copy_bytes, device)}
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["float16"] = torch.float16
    for name, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        fns[name] = lambda a=a, b=b: torch.nn.functional.linear(a, b)
    seconds = time_interleaved(fns, device, config)
    return {
        "copy_gbs": copy_bytes / seconds.pop("copy") / 1e9,
        "copy_buffer_mib": copy_bytes / 2**20,
        "gemm_tflops": {name: 2 * n**3 / s / 1e12 for name, s in seconds.items()},
        "gemm_size": n,
    }

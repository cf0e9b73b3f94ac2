"""merge2x2 vs HF's ``ln_q(x).view(-1, 4 * C)`` (eager and torch.compile), and vlfuse.nn.PatchMerger vs HF's
Qwen2-VL PatchMerger, at the ViT width C = 1280; forward and forward + backward; plus a copy of as many bytes as
the op must move (the bandwidth yardstick). Reported, never asserted.

The cases are plain data (``CASES``) and ``build(case, impl, device)`` returns a zero-argument callable, so other
runners (``vlfuse bench``) can import them. As pytest-benchmark:

    pytest benchmarks/bench_merge.py --benchmark-only

or a quick side-by-side table (implementations interleaved in one loop, median of repeats):

    python benchmarks/bench_merge.py [--tokens 1024 4096] [--dtypes fp32 bf16] [--passes fwd fwd+bwd] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import vlfuse  # noqa: F401  (loads the native library)
from vlfuse import ops
from vlfuse.nn import PatchMerger

CHANNELS = 1280  # Qwen2-VL ViT width
LLM_WIDTH = 1536  # Qwen2-VL-2B language model width
MERGE = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("vlfuse", "eager", "compile", "copy")


@dataclass(frozen=True)
class MergeCase:
    op: str  # "merge2x2" or "PatchMerger"
    tokens: int
    dtype: str  # a key of DTYPES
    pass_: str  # "fwd" or "fwd+bwd"

    @property
    def id(self) -> str:
        return f"{self.op}/{self.tokens}tok/{self.dtype}/{self.pass_}"


CASES = [
    MergeCase(op, tokens, dtype, pass_)
    for op in ("merge2x2", "PatchMerger")
    for tokens in (1024, 4096, 16384)
    for dtype in DTYPES
    for pass_ in ("fwd", "fwd+bwd")
]


def bytes_moved(case: MergeCase) -> int:
    """Bytes the fused op must move: forward reads x and writes as many bytes; backward also reads x and dy and
    writes dx (statistics and the [C] parameters are negligible)."""
    elem = torch.finfo(DTYPES[case.dtype]).bits // 8
    n = case.tokens * CHANNELS * elem
    return 2 * n if case.pass_ == "fwd" else 5 * n


def _grid(tokens: int) -> torch.Tensor:
    side = int(round(tokens**0.5))
    return torch.tensor([[1, side, tokens // side]])


def build(case: MergeCase, impl: str, device: str | torch.device = "cpu") -> Callable[[], object]:
    """A zero-argument callable running one implementation of the case on fresh inputs built here."""
    torch.manual_seed(0)
    dtype = DTYPES[case.dtype]
    width = CHANNELS * MERGE * MERGE
    backward = case.pass_ == "fwd+bwd"
    x = torch.randn(case.tokens, CHANNELS, device=device, dtype=dtype).requires_grad_(backward)
    grid = _grid(case.tokens)
    if impl == "copy":
        # Same bytes as the op: x read and an output of its size written (twice over for the backward's
        # x + dy read and dx write, approximated by a copy of 2.5x as many bytes).
        n = bytes_moved(case) // 2 // x.element_size()
        src = torch.randn(n, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    if case.op == "merge2x2":
        ln_q = torch.nn.LayerNorm(CHANNELS, eps=1e-6).to(device=device, dtype=dtype)
        with torch.no_grad():
            ln_q.weight.uniform_(0.5, 1.5)
            ln_q.bias.uniform_(-0.5, 0.5)
        if impl == "vlfuse":

            def fn(x):
                return ops.merge2x2(x, grid, ln_q.weight, ln_q.bias, eps=1e-6)

        else:

            def fn(x):
                return ln_q(x).view(-1, width)

    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as HFPatchMerger

        hf = HFPatchMerger(LLM_WIDTH, CHANNELS, MERGE).to(device=device, dtype=dtype)
        if impl == "vlfuse":
            merger = PatchMerger(LLM_WIDTH, CHANNELS, MERGE).to(device=device, dtype=dtype)
            merger.load_state_dict(hf.state_dict())

            def fn(x):
                return merger(x, grid)

        else:
            fn = hf

    if impl == "compile":
        fn = torch.compile(fn)
    if not backward:

        def run():
            with torch.no_grad():
                return fn(x)

        return run
    grad = None

    def run_bwd():
        nonlocal grad
        out = fn(x)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        x.grad = None
        return out

    return run_bwd


# ---- pytest-benchmark -----------------------------------------------------------------------------------------


def _params():
    """(case, impl) pairs; all but the 1024-token cases are marked slow (run with VLFUSE_SLOW=1)."""
    return [
        pytest.param(case, impl, id=f"{case.id}-{impl}", marks=() if case.tokens == 1024 else (pytest.mark.slow,))
        for case in CASES
        for impl in IMPLS
    ]


@pytest.mark.parametrize("case, impl", _params())
def bench_merge(benchmark, case, impl):
    if impl == "copy" and case.op != "merge2x2":
        pytest.skip("the copy yardstick is for the memory-bound merge2x2")
    benchmark.group = case.id
    fn = build(case, impl)
    fn()  # warm-up (and compilation)
    benchmark.extra_info["bytes_moved"] = bytes_moved(case)
    benchmark.pedantic(fn, rounds=7, warmup_rounds=1)


# ---- quick table ------------------------------------------------------------------------------------------------


def measure(case: MergeCase, repeats: int = 15, device: str = "cpu") -> dict[str, float]:
    """Median milliseconds per implementation, the implementations interleaved in each repeat."""
    impls = [i for i in IMPLS if i != "copy" or case.op == "merge2x2"]
    # Every case compiles the same `fn` code object again; past dynamo's recompile limit (8) torch.compile would
    # silently run it eagerly, so later cases would time eager under the "compile" label.
    torch._dynamo.reset()
    fns = {impl: build(case, impl, device) for impl in impls}
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(repeats):
        for impl, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[impl].append((time.perf_counter() - start) * 1e3)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--passes", nargs="*", default=["fwd", "fwd+bwd"])
    parser.add_argument("--ops", nargs="*", default=["merge2x2", "PatchMerger"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'case':40s} {'vlfuse ms':>10s} {'eager ms':>10s} {'compile ms':>10s} {'x eager':>8s} {'x compile':>9s} "
          f"{'GB/s':>7s} {'% copy':>7s}")
    for case in CASES:
        if (case.op, case.tokens, case.dtype, case.pass_) not in {
            (o, t, d, p) for o in args.ops for t in args.tokens for d in args.dtypes for p in args.passes
        }:
            continue
        ms = measure(case, args.repeats)
        gbs = bytes_moved(case) / ms["vlfuse"] / 1e6
        pct = f"{100 * ms['copy'] / ms['vlfuse']:6.0f}%" if "copy" in ms else "-"
        print(f"{case.id:40s} {ms['vlfuse']:10.3f} {ms['eager']:10.3f} {ms['compile']:10.3f} "
              f"{ms['eager'] / ms['vlfuse']:8.2f} {ms['compile'] / ms['vlfuse']:9.2f} {gbs:7.1f} {pct:>7s}")


if __name__ == "__main__":
    main()

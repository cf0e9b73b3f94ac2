"""patch_embed vs HF's PatchEmbed (view + Conv3d, kernel = stride) eager, vs torch.compile of it, vs a plain GEMM of
the same size; embed_frames (uint8 frames to embeddings) vs HF's image/video processor patchify + PatchEmbed. The
cases are vlfuse.bench.patchify's, the same as ``python -m vlfuse bench``. Only the --quick cases run unless
VLFUSE_SLOW=1.

    pytest benchmarks/bench_patchify.py --benchmark-only
"""

import pytest
from conftest import case_params, run_benchmark

from vlfuse.bench import patchify


@pytest.mark.parametrize("case, impl", case_params(patchify.cases(), quick_only=True))
def bench_patchify(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)

"""interp_pos_embed vs HF's Qwen3-VL interpolation indices/weights + gather + weighted sum (eager and
torch.compile) and vs a copy of as many bytes. The cases are vlfuse.bench.pos_embed's, the same as
``python -m vlfuse bench``. Only the --quick cases run unless VLFUSE_SLOW=1.

    pytest benchmarks/bench_pos_embed.py --benchmark-only
    python -m vlfuse bench --cases "interp_pos_embed/*"     # the same cases as one interleaved table
"""

import pytest
from conftest import case_params, run_benchmark

from vlfuse.bench import pos_embed


@pytest.mark.parametrize("case, impl", case_params(pos_embed.cases(), quick_only=True))
def bench_pos_embed(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)

"""rope_qkv vs HF's vision rotary path (cos/sin + qkv split + apply_rotary_pos_emb_vision + transposes), vs
torch.compile of it, vs a copy of as many bytes. The cases are vlfuse.bench.rope's, the same as
``python -m vlfuse bench``. Only the --quick cases run unless VLFUSE_SLOW=1.

    pytest benchmarks/bench_rope.py --benchmark-only
"""

import pytest
from conftest import case_params, run_benchmark

from vlfuse.bench import rope


@pytest.mark.parametrize("case, impl", case_params(rope.cases(), quick_only=True))
def bench_rope_qkv(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)

"""The Qwen2-VL vision tower (vlfuse model package vs HF's, same weights; fewer blocks on a CPU) and a training
step of the ``tiny`` model (vlfuse kernels vs the eager backend). The cases are vlfuse.bench.model's, the same as
``python -m vlfuse bench``; none is in --quick, so they run only with VLFUSE_SLOW=1.

    VLFUSE_SLOW=1 pytest benchmarks/bench_model.py --benchmark-only
"""

import pytest
from conftest import case_params, run_benchmark

from vlfuse.bench import model


@pytest.mark.parametrize("case, impl", case_params(model.cases(), quick_only=True))
def bench_model(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)

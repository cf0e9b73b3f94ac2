"""merge2x2 vs HF's ``ln_q(x).view(-1, 4 * C)`` (eager and torch.compile) and vs a copy of as many bytes, and
vlfuse.nn.PatchMerger vs HF's PatchMerger at the 2B and 7B widths. The cases are vlfuse.bench.merge's, the same as
``python -m vlfuse bench``. Only the --quick cases run unless VLFUSE_SLOW=1.

    pytest benchmarks/bench_merge.py --benchmark-only
    python -m vlfuse bench --cases "merge2x2/*"     # the same cases as one interleaved table
"""

import pytest
from conftest import case_params, run_benchmark

from vlfuse.bench import merge


@pytest.mark.parametrize("case, impl", case_params(merge.cases(), quick_only=True))
def bench_merge(benchmark, case, impl):
    run_benchmark(benchmark, case, impl)

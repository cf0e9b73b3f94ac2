"""How the native library was built: its CPU kernels must run in parallel where torch does."""

import pytest
import torch

import vlfuse
from vlfuse.ops import merge2x2


def test_build_info_reports_the_native_library():
    info = vlfuse.build_info()
    assert info["native_loaded"], info.get("native_error")
    assert info["cpu_isa"] in info["cpu_isas_built"]


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="torch itself is not built with OpenMP")
def test_cpu_kernels_are_built_with_openmp_like_torch():
    # Without -fopenmp, at::parallel_for compiled into our objects runs on one thread whatever torch's setting.
    assert vlfuse.build_info()["cpu_openmp"] is True


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    x = torch.randn(4 * 300, 96)
    grid = torch.tensor([[3, 20, 20]])
    weight, bias = torch.randn(96), torch.randn(96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = merge2x2(x, grid, weight, bias)
        torch.set_num_threads(max(2, threads))
        many = merge2x2(x, grid, weight, bias)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(many, one, rtol=0, atol=0)

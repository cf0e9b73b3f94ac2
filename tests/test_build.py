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


@pytest.mark.parametrize("merge_size, postshuffle", [(2, False), (3, False), (2, True)])
def test_results_do_not_depend_on_the_thread_count(merge_size, postshuffle):
    # The backward's weight and bias gradients sum per-chunk partial sums over a fixed split of the rows (chunks
    # of >= 2^18 values of x: 3 to 5 of them here), and its second pass takes tokens in fixed groups that may span
    # rows (m = 3: 9 tokens a row): neither may follow the threads.
    torch.manual_seed(0)
    side = 60 if merge_size == 2 else 63
    x = torch.randn(3 * side * side, 96)
    grid = torch.tensor([[3, side, side]])
    params = 96 * merge_size**2 if postshuffle else 96
    weight, bias = torch.randn(params), torch.randn(params)
    grad = torch.randn(x.shape[0] // merge_size**2, merge_size**2 * 96)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        out = merge2x2(leaves[0], grid, leaves[1], leaves[2], merge_size=merge_size, postshuffle_norm=postshuffle)
        out.backward(grad)
        return [out.detach()] + [t.grad for t in leaves]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

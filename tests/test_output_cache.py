"""The CPU output block cache (csrc/common/cpu_memory.h): freed op outputs of >= 1 MiB are kept and handed to the next
output of about the same size; the values an op returns never depend on what a reused block held."""

import os
import subprocess
import sys

import pytest
import torch
from tolerances import tol

import vlfuse
from vlfuse import ops
from vlfuse import reference as ref
from vlfuse.bench.memory import peak_bytes

HEADS, HEAD_DIM = 8, 64
GRID = [[1, 32, 32]]  # 1024 tokens: q, k, v are 2 MiB each in float32


@pytest.fixture
def cache():
    """A fresh, empty cache with a 256 MiB limit; the previous limit is restored afterwards."""
    limit = vlfuse.output_cache_stats()["limit_bytes"]
    vlfuse.empty_output_cache()
    vlfuse.set_output_cache_limit(256 << 20)
    yield
    vlfuse.set_output_cache_limit(limit)
    vlfuse.empty_output_cache()


def rope_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    pos = ops.vision_positions(torch.tensor(GRID))
    qkv = torch.randn(pos.shape[0], 3 * HEADS * HEAD_DIM, generator=g)
    return qkv, pos, ops.vision_rope_freqs(HEAD_DIM)


def test_freed_outputs_are_reused_and_reused_blocks_hold_only_new_values(cache):
    qkv, pos, freqs = rope_inputs(0)
    outputs = ops.rope_qkv(qkv, pos, freqs, HEADS)  # q and k are new blocks; v is a view of qkv
    block_bytes = outputs[0].numel() * 4
    first = vlfuse.output_cache_stats()
    assert first["live_bytes"] >= 2 * block_bytes
    del outputs
    kept = vlfuse.output_cache_stats()
    assert kept["cached_blocks"] == 2 and kept["cached_bytes"] >= 2 * block_bytes and kept["live_bytes"] == 0

    qkv2, _, _ = rope_inputs(1)
    got = ops.rope_qkv(qkv2, pos, freqs, HEADS)
    after = vlfuse.output_cache_stats()
    assert after["reused"] - kept["reused"] == 2
    assert after["mapped"] == kept["mapped"]
    assert after["cached_bytes"] == 0
    for a, b in zip(got, ref.rope_qkv(qkv2, pos, freqs, HEADS)):
        torch.testing.assert_close(a, b, **tol(torch.float32))


def test_merge2x2_output_and_input_gradient_come_from_the_cache(cache):
    x = torch.randn(4096, 256, requires_grad=True)  # x and grad_x 4 MiB, the merged rows 4 MiB
    grid = torch.tensor([[1, 64, 64]])
    w, b = torch.randn(256), torch.randn(256)
    before = vlfuse.output_cache_stats()
    out = ops.merge2x2(x, grid, w, b)
    out.backward(torch.ones_like(out))
    del out
    assert vlfuse.output_cache_stats()["mapped"] - before["mapped"] == 2
    x.grad = None
    out = ops.merge2x2(x, grid, w, b)
    out.backward(torch.ones_like(out))
    assert vlfuse.output_cache_stats()["reused"] - before["reused"] >= 1
    want = x.detach().requires_grad_()
    ref.merge2x2(want, grid, w, b).backward(torch.ones_like(out))
    torch.testing.assert_close(out, ref.merge2x2(x.detach(), grid, w, b), **tol(torch.float32))
    torch.testing.assert_close(x.grad, want.grad, **tol(torch.float32))


def test_small_outputs_bypass_the_cache(cache):
    qkv, pos, freqs = rope_inputs(0)
    before = vlfuse.output_cache_stats()
    q, k, v = ops.rope_qkv(qkv[:64], pos[:64], freqs, HEADS)  # q and k 128 KiB each
    after = vlfuse.output_cache_stats()
    assert after["mapped"] == before["mapped"] and after["reused"] == before["reused"]
    assert after["live_bytes"] == before["live_bytes"]


def test_limit_zero_keeps_nothing_and_lowering_the_limit_releases_the_oldest(cache):
    qkv, pos, freqs = rope_inputs(0)
    q, k, v = ops.rope_qkv(qkv, pos, freqs, HEADS)
    size = vlfuse.output_cache_stats()["live_bytes"] // 2
    del q, k, v
    assert vlfuse.output_cache_stats()["cached_blocks"] == 2
    vlfuse.set_output_cache_limit(size + size // 2)
    stats = vlfuse.output_cache_stats()
    assert stats["cached_blocks"] == 1 and stats["cached_bytes"] <= size + size // 2

    vlfuse.set_output_cache_limit(0)
    assert vlfuse.output_cache_stats()["cached_bytes"] == 0
    released = vlfuse.output_cache_stats()["released"]
    outputs = ops.rope_qkv(qkv, pos, freqs, HEADS)
    del outputs
    stats = vlfuse.output_cache_stats()
    assert stats["cached_bytes"] == 0 and stats["released"] - released == 2


def test_empty_output_cache_releases_kept_blocks_only(cache):
    qkv, pos, freqs = rope_inputs(0)
    q, k, v = ops.rope_qkv(qkv, pos, freqs, HEADS)
    del k, v
    vlfuse.empty_output_cache()
    stats = vlfuse.output_cache_stats()
    assert stats["cached_bytes"] == 0 and stats["live_bytes"] > 0
    torch.testing.assert_close(q, ref.rope_qkv(qkv, pos, freqs, HEADS)[0], **tol(torch.float32))


def test_outputs_resize_and_are_seen_by_the_memory_profiler(cache):
    qkv, pos, freqs = rope_inputs(0)
    nbytes = 2 * qkv.shape[0] * HEADS * HEAD_DIM * 4
    assert peak_bytes(lambda: ops.rope_qkv(qkv, pos, freqs, HEADS), torch.device("cpu")) >= nbytes
    q = ops.rope_qkv(qkv, pos, freqs, HEADS)[0]
    want = q.clone()
    q.resize_(2 * q.shape[0], HEADS, HEAD_DIM)
    torch.testing.assert_close(q[: want.shape[0]], want)


def test_negative_limit_is_refused():
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        vlfuse.set_output_cache_limit(-1)


@pytest.mark.parametrize(
    ("value", "expect"),
    [("64", "limit 67108864"), ("lots", "VLFUSE_CPU_OUTPUT_CACHE_MB must be a whole number of MiB >= 0, got 'lots'")],
)
def test_limit_comes_from_the_environment(value, expect):
    code = (
        "import torch, vlfuse\n"
        "try:\n"
        "    vlfuse.ops.rope_qkv(torch.randn(1024, 3 * 8 * 64), vlfuse.ops.vision_positions(torch.tensor([[1, 32, 32]])),"
        " vlfuse.ops.vision_rope_freqs(64), 8)\n"
        "    print('limit', vlfuse.output_cache_stats()['limit_bytes'])\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, VLFUSE_CPU_OUTPUT_CACHE_MB=value)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert expect in done.stdout


def _child_allocates(queue):
    torch.set_num_threads(1)  # as in DataLoader workers: OpenMP's pool does not survive a fork
    qkv, pos, freqs = rope_inputs(2)
    got = ops.rope_qkv(qkv, pos, freqs, HEADS)
    want = ref.rope_qkv(qkv, pos, freqs, HEADS)
    queue.put(all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want)))


def test_forked_child_uses_the_cache(cache):
    import multiprocessing

    qkv, pos, freqs = rope_inputs(0)
    outputs = ops.rope_qkv(qkv, pos, freqs, HEADS)
    del outputs  # the child inherits kept blocks
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_allocates, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5)

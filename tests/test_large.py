"""Sizes past 2^31 elements index correctly (int64 offsets in the kernels)."""

import pytest
import torch
from tolerances import tol

from vlfuse import ops
from vlfuse import reference as ref


def available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


NEED_GIB = 8.0


@pytest.mark.skipif(available_gib() < NEED_GIB, reason=f"needs {NEED_GIB} GiB of free memory")
def test_rope_in_place_past_2_pow_31_elements():
    D = 64
    S = 2**31 // D + 4099  # q has more than 2^31 elements: offsets past it must not wrap
    q = torch.ones(S, 1, D, dtype=torch.bfloat16)
    assert q.numel() > 2**31
    k = torch.empty(S, 0, D, dtype=torch.bfloat16)
    pos = (torch.arange(S, dtype=torch.int32) % 997).unsqueeze(1)
    freqs = torch.rand(1, D // 2)
    ops.rope_(q, k, pos, freqs)
    rows = torch.cat([torch.arange(0, 64), torch.randint(0, S, (512,)), torch.arange(S - 5000, S)])
    want = ref.rope(torch.ones(len(rows), 1, D, dtype=torch.bfloat16), pos[rows], freqs)
    torch.testing.assert_close(q[rows], want, **tol(torch.bfloat16))

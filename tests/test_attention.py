"""segment_attention (attention within packed segments: images, frames, windows) against the eager reference
(softmax(q k^T) v per segment) and against HF transformers' own eager_attention_forward run per segment, as the
Qwen vision towers run it; gradients, gradcheck, opcheck, compile, and the argument checks."""

import pytest
import torch
from tolerances import FLOAT_DTYPES, tol

from vlfuse import ops
from vlfuse import reference as ref
from vlfuse.nn import SegmentLayout

# (t, h, w) patch grids; each frame of an item is one segment. Two images of different non-square sizes and a
# video with an odd frame count; one image past several key blocks with a ragged tail; windows of 4 tokens.
GRIDS = {
    "mixed": [(1, 6, 10), (3, 4, 6), (1, 14, 8)],
    "large": [(1, 26, 22), (1, 2, 2)],
    "tiny": [(5, 2, 2)],
}
HEAD_DIMS = [80, 72, 64, 7]


def layout(grid) -> SegmentLayout:
    return SegmentLayout.from_lengths([h * w for t, h, w in grid for _ in range(t)])


def make(grid, heads, head_dim, dtype, seed=0, strided=False):
    """q, k, v [heads, tokens, head_dim]; strided: views of one [tokens, 3, heads, head_dim] projection, as a qkv
    Linear writes it (token stride 3 * heads * head_dim, head stride head_dim)."""
    tokens = layout(grid).tokens
    g = torch.Generator().manual_seed(seed)
    if strided:
        qkv = torch.randn(tokens, 3, heads, head_dim, generator=g).to(dtype)
        return qkv.permute(1, 2, 0, 3).unbind(0)
    return [torch.randn(heads, tokens, head_dim, generator=g).to(dtype) for _ in range(3)]


def close(got, want, dtype):
    t = tol(dtype, scale=8)
    scale = want.float().abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(got.float(), want.float(), rtol=t["rtol"], atol=t["atol"] * scale)


def hf_segment_attention(q, k, v, lay):
    """HF Qwen2-VL's eager attention (transformers.models.qwen2_vl.modeling_qwen2_vl.eager_attention_forward),
    run on each segment as HF's vision attention splits them by cu_seqlens."""
    modeling = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    module.eval()
    H, S, D = q.shape
    outs = []
    for start, count, length in lay.groups:
        for seg in range(count):
            lo = start + seg * length
            qs, ks, vs = (t[None, :, lo : lo + length] for t in (q, k, v))
            out, _ = modeling.eager_attention_forward(module, qs, ks, vs, None, scaling=D**-0.5)
            outs.append(out.reshape(length, H * D))
    return torch.cat(outs)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_reference_and_hf(dtype, grid, head_dim, strided):
    lay = layout(GRIDS[grid])
    q, k, v = make(GRIDS[grid], 3, head_dim, dtype, strided=strided)
    out = ops.segment_attention(q, k, v, lay.groups)
    assert out.shape == (lay.tokens, 3 * head_dim) and out.dtype == dtype and out.is_contiguous()
    want = ref.segment_attention(q, k, v, lay.groups)
    close(out, want, dtype)
    # HF's eager attention rounds its softmax weights to the input dtype: compare in float32 inputs
    hf = hf_segment_attention(*(t.float() for t in (q, k, v)), lay)
    close(out, hf, dtype)


def test_scale_and_sdpa_path_agree():
    lay = layout(GRIDS["mixed"])
    q, k, v = make(GRIDS["mixed"], 2, 16, torch.float32)
    for scale in (None, 0.3, -0.5):
        close(ops.segment_attention(q, k, v, lay.groups, scale), ref.segment_attention(q, k, v, lay.groups, scale),
              torch.float32)
        close(ops.sdpa_segment_attention(q, k, v, lay.groups, scale),
              ref.segment_attention(q, k, v, lay.groups, scale), torch.float32)


def test_logsumexp():
    lay = layout(GRIDS["mixed"])
    q, k, v = make(GRIDS["mixed"], 2, 16, torch.bfloat16)
    _, lse = torch.ops.vlfuse.segment_attention(q, k, v, [x for g in lay.groups for x in g], 0.25)
    assert lse.shape == (2, lay.tokens) and lse.dtype == torch.float32
    want = []
    for start, count, length in lay.groups:
        for seg in range(count):
            lo = start + seg * length
            scores = q[:, lo : lo + length].float() @ k[:, lo : lo + length].float().transpose(1, 2) * 0.25
            want.append(scores.logsumexp(-1))
    torch.testing.assert_close(lse, torch.cat(want, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dtype):
    lay = layout(GRIDS["mixed"])
    q, k, v = (t.requires_grad_() for t in make(GRIDS["mixed"], 3, 72, dtype))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn(lay.tokens, 3 * 72, generator=torch.Generator().manual_seed(1)).to(dtype)
    ops.segment_attention(q, k, v, lay.groups).backward(g)
    ref.segment_attention(q2, k2, v2, lay.groups).backward(g)
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        close(got, want, dtype)


def test_gradcheck_float64():
    lay = layout([(1, 2, 3), (2, 2, 2), (1, 1, 5)])
    q, k, v = (t.requires_grad_() for t in make([(1, 2, 3), (2, 2, 2), (1, 1, 5)], 2, 4, torch.float64))
    flat = [x for g in lay.groups for x in g]

    def op(q, k, v):
        return torch.ops.vlfuse.segment_attention(q, k, v, flat, 0.7)[0]

    assert torch.autograd.gradcheck(op, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    lay = layout(GRIDS["mixed"])
    q, k, v = make(GRIDS["mixed"], 2, 8, dtype, strided=True)
    flat = [x for g in lay.groups for x in g]
    torch.library.opcheck(torch.ops.vlfuse.segment_attention.default, (q, k, v, flat, 0.35))
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vlfuse.segment_attention.default, (qg, kg, vg, flat, 0.35))


def test_compile_fullgraph_dynamic():
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, groups: ops.segment_attention(q, k, v, groups), fullgraph=True, dynamic=True)
    for grid in ("mixed", "tiny"):
        lay = layout(GRIDS[grid])
        q, k, v = make(GRIDS[grid], 2, 8, torch.float32)
        close(fn(q, k, v, lay.groups), ref.segment_attention(q, k, v, lay.groups), torch.float32)


def test_zero_count_runs_and_empty():
    q, k, v = make([(1, 2, 2)], 2, 8, torch.float32)
    groups = ((0, 0, 5), (0, 1, 4))
    close(ops.segment_attention(q, k, v, groups), ref.segment_attention(q, k, v, ((0, 1, 4),)), torch.float32)
    empty = torch.empty(2, 0, 8)
    assert ops.segment_attention(empty, empty, empty, ()).shape == (0, 16)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, k, v, g: (q, k, v, [0, 1]), "triples"),
        (lambda q, k, v, g: (q, k, v, [0, 1, 5]), "cover 5 tokens but q has 4"),
        (lambda q, k, v, g: (q, k, v, [1, 1, 4]), r"groups\[0\]"),
        (lambda q, k, v, g: (q, k, v, [0, 1, 2, 3, 1, 1]), r"groups\[1\]"),
        (lambda q, k, v, g: (q, k, v, [0, 1, 0]), "length >= 1"),
        (lambda q, k, v, g: (q, k.double(), v, g), "k has dtype"),
        (lambda q, k, v, g: (q, k, v[:, :3], g), "v must have q's shape"),
        (lambda q, k, v, g: (q[0], k[0], v[0], g), r"q must be 3-D \[heads, tokens, head_dim\]"),
        (lambda q, k, v, g: (q.int(), k.int(), v.int(), g), "q must be float32"),
    ],
)
def test_bad_arguments(change, match):
    q, k, v = make([(1, 2, 2)], 2, 8, torch.float32)
    args = change(q, k, v, [0, 1, 4])
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        torch.ops.vlfuse.segment_attention(*args, 0.5)


@pytest.mark.parametrize("training", [False, True])
def test_rotary_attention_saves_no_view_of_qkv(training):
    # rope_qkv's v is a view of qkv; under autograd RotaryAttention2D hands attention a copy, so what attention
    # saves for its backward holds a third of qkv, not all of it. Without autograd it keeps the view (no copy).
    from vlfuse.nn import RotaryAttention2D

    torch.manual_seed(0)
    dim, heads = 32, 2
    grid = torch.tensor([[1, 4, 4], [1, 2, 6]])
    x = torch.randn(28, dim, requires_grad=training)
    attn = RotaryAttention2D(dim, heads).requires_grad_(training)
    positions, freqs = ops.vision_positions(grid), ops.vision_rope_freqs(dim // heads)
    segments = SegmentLayout.from_lengths([16, 12])
    qkv_bytes = 28 * 3 * dim * 4
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(x, positions, freqs, segments)
    assert out.requires_grad == training and bool(saved) == training
    assert qkv_bytes not in saved
    with torch.no_grad():
        torch.testing.assert_close(attn(x, positions, freqs, segments), out.detach(), rtol=0, atol=0)

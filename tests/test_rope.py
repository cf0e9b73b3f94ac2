"""rope_qkv / rope / rope_ / rope_cos_sin against the eager reference and HF transformers' own vision rotary."""

import pytest
import torch
from conftest import devices
from tolerances import FLOAT_DTYPES, rope_tol, tol

from vlfuse import ops
from vlfuse import reference as ref

GRIDS = {
    "one_image": [[1, 4, 6]],
    "two_images": [[1, 4, 4], [1, 6, 2]],
    "video_odd_t": [[3, 4, 4]],
    "non_square": [[1, 2, 8]],
    "image_and_video": [[1, 2, 2], [5, 4, 2]],
}
HEADS, HEAD_DIM = 3, 16


def make_qkv(grid, dtype, device, heads=HEADS, head_dim=HEAD_DIM, row_pad=0):
    g = torch.tensor(grid)
    S = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
    wide = torch.randn(S, 3 * heads * head_dim + row_pad, device=device).to(dtype)
    qkv = wide[:, : 3 * heads * head_dim]  # row stride larger than the row when row_pad > 0
    pos = ops.vision_positions(g).to(device)
    freqs = ops.vision_rope_freqs(head_dim).to(device)
    return qkv, pos, freqs, g


def hf_vision_rotary(grid_thw, qkv, heads):
    """HF transformers 5.x path: position ids -> rotary module cos/sin -> apply_rotary_pos_emb_vision."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLVisionRotaryEmbedding,
        apply_rotary_pos_emb_vision,
    )
    from transformers.vision_utils import get_vision_position_ids

    S, width = qkv.shape
    head_dim = width // (3 * heads)
    config = Qwen2VLVisionConfig(embed_dim=heads * head_dim, num_heads=heads, depth=1)
    rotary = Qwen2VLVisionRotaryEmbedding(config).to(qkv.device)
    position_ids = get_vision_position_ids(grid_thw.to(qkv.device), 2)
    cos, sin = rotary(qkv, position_ids)
    q, k, v = qkv.reshape(S, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q, k, v, cos, sin


def hf_qwen3_vision_rotary(grid_thw, qkv, heads):
    """HF transformers 5.x Qwen3-VL path (axial rope over the whole head dim): position ids -> rotary module
    cos/sin -> apply_rotary_pos_emb_vision."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLVisionRotaryEmbedding,
        apply_rotary_pos_emb_vision,
    )
    from transformers.vision_utils import get_vision_position_ids

    S, width = qkv.shape
    head_dim = width // (3 * heads)
    config = Qwen3VLVisionConfig(hidden_size=heads * head_dim, num_heads=heads, depth=1)
    rotary = Qwen3VLVisionRotaryEmbedding(config).to(qkv.device)
    cos, sin = rotary(qkv, get_vision_position_ids(grid_thw.to(qkv.device), 2))
    q, k, v = qkv.reshape(S, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q, k, v, cos, sin


@pytest.mark.parametrize("device", devices())
def test_vision_positions_and_freqs_match_reference_and_hf(device):
    from transformers.vision_utils import get_vision_position_ids

    for grid in GRIDS.values():
        g = torch.tensor(grid, device=device)
        got = ops.vision_positions(g)
        torch.testing.assert_close(got.cpu(), ref.vision_positions(g.cpu()), rtol=0, atol=0)
        torch.testing.assert_close(got, get_vision_position_ids(g, 2).to(got.dtype), rtol=0, atol=0)
    for head_dim in (16, 64, 72, 80, 128):
        torch.testing.assert_close(ops.vision_rope_freqs(head_dim), ref.vision_rope_freqs(head_dim), rtol=0, atol=0)
    assert ops.vision_positions(torch.zeros(0, 3, dtype=torch.int64)).shape == (0, 2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("grid", list(GRIDS.values()), ids=list(GRIDS))
@pytest.mark.parametrize("layout", ["shd", "hsd"])
def test_rope_qkv_matches_reference_and_hf(device, dtype, grid, layout):
    qkv, pos, freqs, g = make_qkv(grid, dtype, device, row_pad=8)
    q, k, v = ops.rope_qkv(qkv, pos, freqs, HEADS, layout)
    rq, rk, rv = ref.rope_qkv(qkv, pos, freqs, HEADS, layout)
    for got, want in ((q, rq), (k, rk), (v, rv)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol(dtype))
    assert q.is_contiguous() and k.is_contiguous()
    # v is qkv's v block, not a copy: HF's split hands out the same view
    v_shd = v.transpose(0, 1) if layout == "hsd" else v
    assert v_shd.data_ptr() == qkv[:, 2 * HEADS * HEAD_DIM :].data_ptr()
    assert v_shd.stride() == (qkv.stride(0), HEAD_DIM, 1)
    hq, hk, hv, _, _ = hf_vision_rotary(g, qkv, HEADS)
    to_shd = (lambda t: t.transpose(0, 1)) if layout == "hsd" else (lambda t: t)
    torch.testing.assert_close(to_shd(q), hq, **tol(dtype))
    torch.testing.assert_close(to_shd(k), hk, **tol(dtype))
    torch.testing.assert_close(to_shd(v), hv, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_rope_qkv_qwen2vl_2b_head_shape(device):
    # 16 heads x 80: the real vision head size (40 pairs: vector main loop plus a tail on every ISA).
    qkv, pos, freqs, _ = make_qkv([[1, 8, 6]], torch.bfloat16, device, heads=16, head_dim=80)
    for got, want in zip(ops.rope_qkv(qkv, pos, freqs, 16, "hsd"), ref.rope_qkv(qkv, pos, freqs, 16, "hsd")):
        torch.testing.assert_close(got, want, **tol(torch.bfloat16))


# Qwen3-VL's vision heads: 16 x 72. The rotate-half split falls at 36 pairs, which no 16-byte bf16 vector (8)
# divides: the CPU kernel ends each half with an overlapping whole vector or (bf16 on AVX2) a 4-pair 128-bit
# step, the CUDA kernel uses 8-byte vectors.
QWEN3_HEADS, QWEN3_HEAD_DIM = 16, 72


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", [GRIDS["two_images"], GRIDS["video_odd_t"], GRIDS["non_square"]],
                         ids=["two_images", "video_odd_t", "non_square"])
@pytest.mark.parametrize("layout", ["shd", "hsd"])
def test_rope_qkv_head_dim_72_matches_hf_qwen3_vl(device, dtype, grid, layout):
    qkv, pos, freqs, g = make_qkv(grid, dtype, device, QWEN3_HEADS, QWEN3_HEAD_DIM, row_pad=8)
    q, k, v = ops.rope_qkv(qkv, pos, freqs, QWEN3_HEADS, layout)
    hq, hk, hv, _, _ = hf_qwen3_vision_rotary(g, qkv, QWEN3_HEADS)
    to_shd = (lambda t: t.transpose(0, 1)) if layout == "hsd" else (lambda t: t)
    torch.testing.assert_close(to_shd(q), hq, **tol(dtype))
    torch.testing.assert_close(to_shd(k), hk, **tol(dtype))
    torch.testing.assert_close(to_shd(v), hv, rtol=0, atol=0)
    for got, want in zip((q, k, v), ref.rope_qkv(qkv, pos, freqs, QWEN3_HEADS, layout)):
        torch.testing.assert_close(got, want, **tol(dtype))
    # The backward rotates the other way through the same walk.
    leaf = qkv.detach().float().requires_grad_()
    grads = [torch.randn(t.shape, device=device).to(dtype) for t in (q, k, v)]
    torch.autograd.backward(ref.rope_qkv(leaf, pos, freqs, QWEN3_HEADS, layout), [t.float() for t in grads])
    got = torch.ops.vlfuse.rope_qkv_backward(*grads, pos, freqs, layout)
    torch.testing.assert_close(got.float(), leaf.grad, **tol(dtype, scale=2))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_cos_sin_head_dim_72_matches_hf_qwen3_vl(device, dtype):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    qkv, _, _, g = make_qkv(GRIDS["image_and_video"], dtype, device, QWEN3_HEADS, QWEN3_HEAD_DIM)
    hq, hk, _, cos, sin = hf_qwen3_vision_rotary(g, qkv, QWEN3_HEADS)
    S = qkv.shape[0]
    q, k, _ = qkv.reshape(S, 3, QWEN3_HEADS, -1).unbind(1)  # non-contiguous views, as HF hands them over
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    got_q, got_k = ops.rope_cos_sin(q, k, cos, sin)
    torch.testing.assert_close(got_q, hq, **tol(dtype))
    torch.testing.assert_close(got_k, hk, **tol(dtype))
    grads = [torch.randn_like(got_q), torch.randn_like(got_k)]
    got_grads = torch.autograd.grad([got_q, got_k], [q, k], grads)
    hf_leaves = [t.detach().requires_grad_() for t in (q, k)]
    want_grads = torch.autograd.grad(apply_rotary_pos_emb_vision(*hf_leaves, cos, sin), hf_leaves, grads)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("head_dim", [2, 6, 20, 36, 64, 72, 80, 96, 128])
@pytest.mark.parametrize("layout", ["shd", "hsd"])
def test_rope_qkv_head_dims_and_token_tiles(device, dtype, head_dim, layout):
    # pair counts below, at, and past the CPU vector width (8 or 16 floats), with partial tails, and the models'
    # head dims (64, 72, 80, 128); 45 tokens span several of the CPU kernel's token tiles with a short last one.
    # Forward and the backward op, vs the reference.
    S, heads, axes = 45, 3, 2
    qkv = torch.randn(S, 3 * heads * head_dim, device=device).to(dtype)
    pos = torch.randint(0, 40, (S, axes), device=device)
    freqs = torch.rand(axes, head_dim // 2, device=device)
    t = rope_tol(dtype, ref.rope_angles(pos, freqs).abs().max().item())
    for got, want in zip(ops.rope_qkv(qkv, pos, freqs, heads, layout), ref.rope_qkv(qkv, pos, freqs, heads, layout)):
        torch.testing.assert_close(got, want, **t)
    grads = [torch.randn(got.shape, device=device).to(dtype) for got in ref.rope_qkv(qkv, pos, freqs, heads, layout)]
    got = torch.ops.vlfuse.rope_qkv_backward(*grads, pos, freqs, layout)
    want = qkv.float().requires_grad_()
    torch.autograd.backward(ref.rope_qkv(want, pos, freqs, heads, layout), [g.float() for g in grads])
    torch.testing.assert_close(got.float(), want.grad, **t)


@pytest.mark.parametrize("device", devices())
def test_rope_qkv_non_unit_inner_stride_and_int32_positions(device):
    qkv, pos, freqs, _ = make_qkv([[1, 4, 4]], torch.float32, device)
    strided = qkv.t().contiguous().t()  # same values, column-major: stride(1) != 1
    assert strided.stride(1) != 1
    got = ops.rope_qkv(strided, pos.int(), freqs, HEADS)
    for a, b in zip(got, ref.rope_qkv(qkv, pos, freqs, HEADS)):
        torch.testing.assert_close(a, b, **tol(torch.float32))


@pytest.mark.parametrize("device", devices())
def test_zero_tokens(device):
    qkv = torch.zeros(0, 3 * HEADS * HEAD_DIM, device=device)
    pos = torch.zeros(0, 2, dtype=torch.int64, device=device)
    freqs = ops.vision_rope_freqs(HEAD_DIM).to(device)
    q, k, v = ops.rope_qkv(qkv, pos, freqs, HEADS, "hsd")
    assert q.shape == k.shape == v.shape == (HEADS, 0, HEAD_DIM)
    q0 = torch.zeros(0, 2, HEAD_DIM, device=device)
    assert ops.rope(q0, q0, pos, freqs)[0].shape == (0, 2, HEAD_DIM)
    cs = torch.zeros(0, HEAD_DIM, device=device)
    assert ops.rope_cos_sin(q0, q0, cs, cs)[1].shape == (0, 2, HEAD_DIM)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
# 80: whole vector blocks of pairs and a tail (bf16 on AVX2; every dtype on AVX-512); 72: an overlapping last
# vector on every ISA; 64 and 128: whole blocks only
@pytest.mark.parametrize("head_dim", [HEAD_DIM, 64, 72, 80, 128])
def test_rope_cos_sin_equals_hf_apply_rotary_pos_emb_vision(device, dtype, head_dim):
    qkv, pos, freqs, g = make_qkv(GRIDS["image_and_video"], dtype, device, head_dim=head_dim)
    hq, hk, _, cos, sin = hf_vision_rotary(g, qkv, HEADS)
    S = qkv.shape[0]
    q, k, _ = qkv.reshape(S, 3, HEADS, -1).unbind(1)  # non-contiguous views, as HF hands them over
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    got_q, got_k = ops.rope_cos_sin(q, k, cos, sin)
    torch.testing.assert_close(got_q, hq, **tol(dtype))
    torch.testing.assert_close(got_k, hk, **tol(dtype))
    rq, rk = ref.rope_cos_sin(q, k, cos, sin)
    torch.testing.assert_close(got_q, rq, **tol(dtype))
    torch.testing.assert_close(got_k, rk, **tol(dtype))
    grads = [torch.randn_like(got_q), torch.randn_like(got_k)]
    got_grads = torch.autograd.grad([got_q, got_k], [q, k], grads)
    want_grads = torch.autograd.grad([rq, rk], [q, k], grads)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("axes", [1, 2, 3, 4])
# 36, 72, 80: partial last vectors, overlapped; 64: whole vectors; 128: the LLM's head dim
@pytest.mark.parametrize("D", [24, 36, 64, 72, 80, 128])
def test_rope_multi_axis_gqa_matches_reference(device, dtype, axes, D):
    S, Hq, Hk = 37, 4, 2
    base_q = torch.randn(Hq, S, D, device=device).to(dtype)
    q = base_q.transpose(0, 1)  # [S, Hq, D] with free strides on S and H
    k = torch.randn(S, Hk, 2 * D, device=device).to(dtype)[..., :D]
    pos = torch.randint(0, 300, (S, axes), device=device)
    freqs = torch.rand(axes, D // 2, device=device)
    got_q, got_k = ops.rope(q, k, pos, freqs)
    t = rope_tol(dtype, ref.rope_angles(pos, freqs).abs().max().item())
    torch.testing.assert_close(got_q, ref.rope(q, pos, freqs), **t)
    torch.testing.assert_close(got_k, ref.rope(k, pos, freqs), **t)
    # in place: same numbers, same storage
    q2, k2 = q.clone(), k.contiguous()
    out = ops.rope_(q2, k2, pos, freqs)
    assert out[0] is q2 and out[1] is k2
    torch.testing.assert_close(q2, got_q, rtol=0, atol=0)
    torch.testing.assert_close(k2, got_k, rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
def test_rope_llm_mrope_against_hf_multimodal_rotary(device):
    """The LLM's 3-axis multimodal RoPE, as one [3, D/2] frequency matrix, equals HF's Qwen2VLRotaryEmbedding
    (mrope_section recomposition) followed by apply_rotary_pos_emb."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, apply_rotary_pos_emb

    S, H, D, section, theta = 19, 2, 32, [4, 6, 6], 10000.0
    config = Qwen2VLTextConfig(
        hidden_size=H * D,
        num_attention_heads=H,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section},
    )
    rotary = Qwen2VLRotaryEmbedding(config)
    axis_of_pair = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    freqs = torch.zeros(3, D // 2)
    freqs[axis_of_pair, torch.arange(D // 2)] = rotary.inv_freq
    pos = torch.randint(0, 50, (S, 3))
    q = torch.randn(1, H, S, D)
    k = torch.randn(1, H, S, D)
    cos, sin = rotary(q, pos.t()[:, None, :])
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    got_q, got_k = ops.rope(
        q[0].transpose(0, 1).to(device), k[0].transpose(0, 1).to(device), pos.to(device), freqs.to(device)
    )
    torch.testing.assert_close(got_q.cpu(), hq[0].transpose(0, 1), **tol(torch.float32, scale=4))
    torch.testing.assert_close(got_k.cpu(), hk[0].transpose(0, 1), **tol(torch.float32, scale=4))


def _double_case(grid=((1, 2, 4),), heads=2, head_dim=8, device="cpu"):
    qkv, pos, freqs, _ = make_qkv([list(r) for r in grid], torch.float64, device, heads, head_dim)
    return qkv.detach().requires_grad_(), pos, freqs.double().requires_grad_()


@pytest.mark.parametrize("layout", ["shd", "hsd"])
def test_rope_qkv_gradcheck(layout):
    qkv, pos, freqs = _double_case()
    assert torch.autograd.gradcheck(lambda a, f: ops.rope_qkv(a, pos, f, 2, layout), (qkv, freqs))
    assert torch.autograd.gradgradcheck(lambda a: ops.rope_qkv(a, pos, freqs.detach(), 2, layout), (qkv,))


def test_rope_and_cos_sin_gradcheck():
    S, D = 6, 8
    q = torch.randn(S, 3, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(S, 1, D, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 9, (S, 3))
    freqs = torch.rand(3, D // 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, f: ops.rope(a, b, pos, f), (q, k, freqs))
    cos = torch.randn(S, D, dtype=torch.float64, requires_grad=True)
    sin = torch.randn(S, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, s: ops.rope_cos_sin(a, b, c, s), (q, k, cos, sin))
    # in place on non-leaf tensors
    assert torch.autograd.gradcheck(lambda a, b: ops.rope_(a * 1, b * 1, pos, freqs.detach()), (q, k))


def test_rope_qkv_backward_matches_autograd_through_reference():
    qkv, pos, freqs, _ = make_qkv(GRIDS["two_images"], torch.float32, "cpu")
    qkv = qkv.detach().requires_grad_()
    grads = [torch.randn(HEADS, qkv.shape[0], HEAD_DIM) for _ in range(3)]
    torch.autograd.backward(ops.rope_qkv(qkv, pos, freqs, HEADS, "hsd"), grads)
    want = qkv.detach().requires_grad_()
    torch.autograd.backward(ref.rope_qkv(want, pos, freqs, HEADS, "hsd"), grads)
    torch.testing.assert_close(qkv.grad, want.grad, **tol(torch.float32))


@pytest.mark.parametrize("layout", ["shd", "hsd"])
def test_rope_qkv_records_q_k_and_the_v_view_as_one_node(layout):
    # v is a view of qkv: the public function records the op and the view as one node, whose backward packs the
    # three gradients in one pass; the bare op (q and k only) and the backward op without grad_v leave the v block
    # of the gradient zero.
    qkv, pos, freqs, _ = make_qkv(GRIDS["image_and_video"], torch.float64, "cpu")
    qkv = qkv.detach().requires_grad_()
    q, k, v = ops.rope_qkv(qkv, pos, freqs, HEADS, layout)
    assert q.grad_fn is k.grad_fn is v.grad_fn
    grad_v = torch.randn_like(v)
    v.backward(grad_v)
    v_block = qkv.grad.unflatten(1, (3, HEADS, HEAD_DIM))
    to_shd = (lambda t: t.transpose(0, 1)) if layout == "hsd" else (lambda t: t)
    torch.testing.assert_close(v_block[:, 2], to_shd(grad_v), rtol=0, atol=0)
    assert not v_block[:, :2].any()

    qkv.grad = None
    bare_q, bare_k = torch.ops.vlfuse.rope_qkv(qkv, pos, freqs, HEADS, layout)
    torch.testing.assert_close((bare_q, bare_k), (q, k), rtol=0, atol=0)
    (bare_q.sum() + bare_k.sum()).backward()
    want = qkv.detach().requires_grad_()
    q2, k2, _ = ref.rope_qkv(want, pos, freqs, HEADS, layout)
    (q2.sum() + k2.sum()).backward()
    torch.testing.assert_close(qkv.grad, want.grad)
    assert not qkv.grad.unflatten(1, (3, HEADS, HEAD_DIM))[:, 2].any()

    packed = torch.ops.vlfuse.rope_qkv_backward(torch.ones_like(q), torch.ones_like(k), None, pos, freqs, layout)
    torch.testing.assert_close(packed, qkv.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "layout", "grid", "head_dim"),
    [
        (torch.float32, "hsd", [2, 64, 64], 80),
        (torch.float32, "shd", [2, 64, 64], 80),
        (torch.bfloat16, "shd", [2, 64, 64], 80),
        (torch.bfloat16, "hsd", [4, 64, 64], 80),
        (torch.float32, "hsd", [2, 62, 66], 72),
    ],
)
def test_rope_qkv_outputs_of_huge_page_size_match_reference(dtype, layout, grid, head_dim):
    # 16 heads and 8192 tokens: q, k and grad_qkv are >= 32 MiB each in float32, the size from which the CPU
    # output cache maps its blocks 2 MiB-aligned with the huge-page hint (csrc/common/cpu_memory.h), and the calls
    # move more than the last-level cache holds, so they are written with streaming stores (csrc/rope/rope_cpu.cpp;
    # [H, S, D] head-major by tiles of 16 tokens; the D = 72 case, 8184 tokens, ends in a partial tile); values
    # must not depend on either.
    qkv, pos, freqs, _ = make_qkv([grid], dtype, "cpu", heads=16, head_dim=head_dim)
    assert 2 * qkv.numel() * qkv.element_size() >= 64 << 20
    qkv = qkv.requires_grad_()
    got = ops.rope_qkv(qkv, pos, freqs, 16, layout)
    want = ref.rope_qkv(qkv.detach(), pos, freqs, 16, layout)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(dtype))
    grads = [torch.randn_like(t) for t in got]
    torch.autograd.backward(got, grads)
    expected = qkv.detach().requires_grad_()
    torch.autograd.backward(ref.rope_qkv(expected, pos, freqs, 16, layout), grads)
    torch.testing.assert_close(qkv.grad, expected.grad, **tol(dtype))


@pytest.mark.parametrize("tokens", [45, 8184])
def test_rope_from_head_major_planes(tokens):
    # q [S, Hq, D] and k [S, Hk, D] as transposed [H, S, D] planes (what rope_qkv_backward reads): the CPU kernel
    # walks them head-major by tiles of 16 tokens, through a staged, streamed tile at 8184 tokens (over 40 MiB
    # moved), with tensors of different head counts and a partial last tile.
    torch.manual_seed(0)
    D = 80
    q = torch.randn(16, tokens, D).transpose(0, 1)
    k = torch.randn(2, tokens, D).transpose(0, 1)
    pos = torch.randint(0, 64, (tokens, 2))
    freqs = ops.vision_rope_freqs(D)
    for inverse in (False, True):
        got = torch.ops.vlfuse.rope(q, k, pos, freqs, inverse)
        for a, x in zip(got, (q, k)):
            assert a.is_contiguous()
            torch.testing.assert_close(a, ref.rope(x, pos, freqs, inverse), **tol(torch.float32))


def _opcheck_samples(device):
    qkv, pos, freqs, _ = make_qkv(GRIDS["image_and_video"], torch.float32, device)
    q = torch.randn(qkv.shape[0], 3, HEAD_DIM, device=device)
    k = torch.randn(qkv.shape[0], 1, HEAD_DIM, device=device)
    cos = torch.randn(qkv.shape[0], HEAD_DIM, device=device)
    g = torch.randn(qkv.shape[0], HEADS, HEAD_DIM, device=device)
    return [
        ("rope_qkv", (qkv.requires_grad_(), pos, freqs, HEADS, "hsd")),
        ("rope_qkv", (qkv.detach(), pos, freqs.requires_grad_(), HEADS, "shd")),
        ("rope_qkv_backward", (g, g.clone(), g.clone(), pos, freqs.detach(), "shd")),
        ("rope_qkv_backward", (g.transpose(0, 1), g.transpose(0, 1), None, pos, freqs.detach(), "hsd")),
        ("rope", (q.requires_grad_(), k.requires_grad_(), pos, freqs.detach(), False)),
        ("rope", (q.detach(), k.detach(), pos, freqs.detach(), True)),
        ("rope_", (q.detach().clone(), k.detach().clone(), pos, freqs.detach(), False)),
        ("rope_cos_sin", (q.detach().requires_grad_(), k.detach(), cos, cos.sin(), False)),
    ]


@pytest.mark.parametrize("device", devices())
def test_opcheck_every_rope_op(device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.vlfuse, name).default, args)


def test_compile_fullgraph_no_graph_break():
    qkv, pos, freqs, _ = make_qkv(GRIDS["two_images"], torch.float32, "cpu")
    cos = torch.randn(qkv.shape[0], HEAD_DIM)

    def f(qkv, pos, freqs, cos):
        q, k, v = ops.rope_qkv(qkv, pos, freqs, HEADS, "hsd")
        q2, k2 = ops.rope(q.transpose(0, 1), k.transpose(0, 1), pos, freqs)
        q3, k3 = ops.rope_cos_sin(q2, k2, cos, cos.sin())
        return q3.sum() + k3.sum() + v.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(qkv, pos, freqs, cos), f(qkv, pos, freqs, cos))
    # recorded for autograd: rope_qkv's own Function (q, k and the v view) traced whole, gradients as in eager
    leaves = [qkv.detach().clone().requires_grad_() for _ in range(2)]
    compiled(leaves[0], pos, freqs, cos).backward()
    f(leaves[1], pos, freqs, cos).backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad)

"""Bad input gets a clear error naming the argument, never a crash or a silent wrong answer (issue 9).

One table: each case calls a public op with one thing wrong and names the exception type and the key words the
message must contain. The checks live in the C++ ops; the fake kernels repeat them for torch.compile, and the
second half of this file checks that both raise the same error."""

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vlfuse import ops

F = ops.vision_rope_freqs(16)
POS = ops.vision_positions(torch.tensor([[1, 2, 2]]))  # 4 tokens
QKV = torch.randn(4, 3 * 2 * 16)
QH = torch.randn(2, 4, 16)  # [heads, tokens, head_dim]
Q = torch.randn(4, 2, 16)
K = torch.randn(4, 1, 16)
COS = torch.randn(4, 16)


def frames(t=1, c=3, h=28, w=28, dtype=torch.uint8):
    return torch.randint(0, 255, (t, c, h, w), dtype=torch.uint8).to(dtype)


PATCHES = torch.randn(3, 3 * 2 * 14 * 14)
X = torch.randn(8, 6)  # two 2x2 windows
GRID = torch.tensor([[2, 2, 2]])
LN_W, LN_B = torch.ones(6), torch.zeros(6)
WEIGHT = torch.randn(8, 3, 2, 14, 14)
TABLE = torch.randn(36, 6)  # a 6 x 6 position table
LIN_W, LIN_B = torch.randn(8, 6), torch.randn(8)  # a Linear 6 -> 8 for X

CASES = [
    # ---- rope_qkv ----
    ("rope_qkv int qkv", lambda: ops.rope_qkv(QKV.long(), POS, F, 2), TypeError, ["qkv", "float32"]),
    ("rope_qkv 3-D qkv", lambda: ops.rope_qkv(QKV[None], POS, F, 2), ValueError, ["qkv", "2-D"]),
    ("rope_qkv width", lambda: ops.rope_qkv(QKV[:, :-3], POS, F, 2), ValueError, ["last dimension", "3 * num_heads"]),
    ("rope_qkv heads 0", lambda: ops.rope_qkv(QKV, POS, F, 0), ValueError, ["num_heads", "positive"]),
    ("rope_qkv heads <0", lambda: ops.rope_qkv(QKV, POS, F, -2), ValueError, ["num_heads", "positive"]),
    ("rope_qkv odd head_dim", lambda: ops.rope_qkv(torch.randn(4, 3 * 2 * 15), POS, F, 2), ValueError, ["head_dim", "even"]),
    ("rope_qkv layout", lambda: ops.rope_qkv(QKV, POS, F, 2, "bshd"), ValueError, ["out_layout", "hsd"]),
    ("rope_qkv float positions", lambda: ops.rope_qkv(QKV, POS.float(), F, 2), TypeError, ["positions", "int64"]),
    ("rope_qkv 1-D positions", lambda: ops.rope_qkv(QKV, POS[:, 0], F, 2), ValueError, ["positions", "2-D"]),
    ("rope_qkv positions rows", lambda: ops.rope_qkv(QKV, POS[:3], F, 2), ValueError, ["positions has 3 rows", "4 tokens"]),
    ("rope_qkv 5 axes", lambda: ops.rope_qkv(QKV, POS.repeat(1, 3)[:, :5], F, 2), ValueError, ["positions", "1 to 4 axes"]),
    ("rope_qkv 0 axes", lambda: ops.rope_qkv(QKV, POS[:, :0], F, 2), ValueError, ["positions", "axes"]),
    ("rope_qkv freqs shape", lambda: ops.rope_qkv(QKV, POS, F[:, :4], 2), ValueError, ["freqs", "[axes, head_dim / 2]"]),
    ("rope_qkv freqs axes", lambda: ops.rope_qkv(QKV, POS, F[:1], 2), ValueError, ["freqs", "[2, 8]"]),
    ("rope_qkv freqs dtype", lambda: ops.rope_qkv(QKV, POS, F.half(), 2), TypeError, ["freqs", "float32"]),
    # ---- rope / rope_ ----
    ("rope 2-D q", lambda: ops.rope(Q[:, 0], K, POS, F), ValueError, ["q", "3-D"]),
    ("rope k tokens", lambda: ops.rope(Q, K[:3], POS, F), ValueError, ["k", "tokens"]),
    ("rope k head_dim", lambda: ops.rope(Q, torch.randn(4, 1, 8), POS, F), ValueError, ["k", "[tokens, heads, 16]"]),
    ("rope k dtype", lambda: ops.rope(Q, K.half(), POS, F), TypeError, ["k has dtype", "q has"]),
    ("rope int q", lambda: ops.rope(Q.int(), K.int(), POS, F), TypeError, ["q", "float32"]),
    ("rope odd head_dim", lambda: ops.rope(Q[..., :15], K[..., :15], POS, F), ValueError, ["head_dim", "even"]),
    ("rope positions rows", lambda: ops.rope(Q, K, POS[:2], F), ValueError, ["positions", "tokens"]),
    ("rope freqs", lambda: ops.rope(Q, K, POS, F[:, :3]), ValueError, ["freqs"]),
    ("rope_ expanded q", lambda: ops.rope_(torch.randn(1, 2, 16).expand(4, 2, 16), K.clone(), POS, F), ValueError, ["q", "overlapping"]),
    ("rope_ expanded k", lambda: ops.rope_(Q.clone(), torch.randn(1, 1, 16).expand(4, 1, 16), POS, F), ValueError, ["k", "overlapping"]),
    ("rope_ q is k", lambda: (lambda t: ops.rope_(t, t, POS, F))(Q.clone()), ValueError, ["q and k share memory"]),
    ("rope_ strided D", lambda: ops.rope_(Q.clone().transpose(1, 2).contiguous().transpose(1, 2)[:, :, :], K.clone().transpose(1, 2).contiguous().transpose(1, 2), POS, F), ValueError, ["unit stride", "head_dim"]),
    # ---- rope_cos_sin ----
    ("rope_cos_sin cos shape", lambda: ops.rope_cos_sin(Q, K, COS[:, :8], COS), ValueError, ["cos", "[tokens, head_dim]"]),
    ("rope_cos_sin sin rows", lambda: ops.rope_cos_sin(Q, K, COS, COS[:3]), ValueError, ["sin", "[4, 16]"]),
    ("rope_cos_sin int cos", lambda: ops.rope_cos_sin(Q, K, COS.long(), COS), TypeError, ["cos", "float32"]),
    ("rope_cos_sin 1-D cos", lambda: ops.rope_cos_sin(Q, K, COS[0], COS), ValueError, ["cos"]),
    # ---- vision helpers ----
    ("vision_positions shape", lambda: ops.vision_positions(torch.tensor([1, 2, 2])), ValueError, ["grid_thw", "[items, 3]"]),
    ("vision_positions odd grid", lambda: ops.vision_positions(torch.tensor([[1, 3, 2]])), ValueError, ["multiples of merge_size"]),
    ("vision_positions negative", lambda: ops.vision_positions(torch.tensor([[1, -2, 2]])), ValueError, ["non-negative"]),
    ("vision_positions merge 0", lambda: ops.vision_positions(torch.tensor([[1, 2, 2]]), 0), ValueError, ["merge_size", ">= 1"]),
    ("vision_rope_freqs odd", lambda: ops.vision_rope_freqs(15), ValueError, ["head_dim", "even"]),
    ("vision_rope_freqs zero", lambda: ops.vision_rope_freqs(0), ValueError, ["head_dim", "positive"]),
    # ---- patchify ----
    ("patchify empty list", lambda: ops.patchify([]), ValueError, ["frames", "at least one"]),
    ("patchify 3-D frames", lambda: ops.patchify(frames()[0]), ValueError, ["frames[0]", "4-D"]),
    ("patchify height 30", lambda: ops.patchify(frames(h=30)), ValueError, ["frames[0]", "30", "nearest valid", "28"]),
    ("patchify width 50", lambda: ops.patchify(frames(w=50)), ValueError, ["width", "56", "smart_resize"]),
    ("patchify size 0", lambda: ops.patchify(frames(h=0)), ValueError, ["frames[0]", "28"]),
    ("patchify zero frames", lambda: ops.patchify(frames(t=0)), ValueError, ["at least one frame"]),
    ("patchify int32 frames", lambda: ops.patchify(frames(dtype=torch.int32)), TypeError, ["frames[0]", "uint8"]),
    ("patchify mixed dtypes", lambda: ops.patchify([frames(), frames(dtype=torch.float32)]), TypeError, ["frames[1]", "dtype"]),
    ("patchify channel mismatch", lambda: ops.patchify([frames(), frames(c=1)]), ValueError, ["frames[1]", "channels"]),
    ("patchify mean length", lambda: ops.patchify(frames(), mean=(0.5, 0.5)), ValueError, ["mean", "per channel"]),
    ("patchify std zero", lambda: ops.patchify(frames(), std=(0.0, 1.0, 1.0)), ValueError, ["std", "non-zero"]),
    ("patchify std nan", lambda: ops.patchify(frames(), std=(float("nan"), 1.0, 1.0)), ValueError, ["finite"]),
    ("patchify patch 0", lambda: ops.patchify(frames(), patch_size=0), ValueError, ["patch_size", "positive"]),
    ("patchify temporal 0", lambda: ops.patchify(frames(), temporal_patch_size=0), ValueError, ["temporal_patch_size", "positive"]),
    ("patchify merge 0", lambda: ops.patchify(frames(), merge_size=0), ValueError, ["merge_size", "positive"]),
    ("patchify int out", lambda: ops.patchify(frames(), out_dtype=torch.int64), TypeError, ["out_dtype"]),
    ("patch_embed 1-D patches", lambda: ops.patch_embed(PATCHES[0], WEIGHT), ValueError, ["patches", "2-D"]),
    ("patch_embed K mismatch", lambda: ops.patch_embed(PATCHES[:, :100], WEIGHT), ValueError, ["patches has 100", "weight"]),
    ("patch_embed int patches", lambda: ops.patch_embed(PATCHES.long(), WEIGHT), TypeError, ["patches", "float32"]),
    ("patch_embed int weight", lambda: ops.patch_embed(PATCHES, WEIGHT.long()), TypeError, ["weight", "float32"]),
    ("patch_embed 1-D weight", lambda: ops.patch_embed(PATCHES, WEIGHT.flatten()), ValueError, ["weight", "Conv3d"]),
    ("patch_embed bias shape", lambda: ops.patch_embed(PATCHES, WEIGHT, torch.randn(7)), ValueError, ["bias", "[E] = [8]"]),
    ("patch_embed bias dtype", lambda: ops.patch_embed(PATCHES, WEIGHT, torch.randn(8).double()), TypeError, ["bias has dtype"]),
    # ---- merge2x2 ----
    ("merge2x2 int x", lambda: ops.merge2x2(X.long(), GRID, LN_W), TypeError, ["x", "float32"]),
    ("merge2x2 1-D x", lambda: ops.merge2x2(X[0], GRID, LN_W), ValueError, ["x", "2-D"]),
    ("merge2x2 tokens not m^2", lambda: ops.merge2x2(X[:7], GRID, LN_W), ValueError, ["x has 7 tokens", "merge_size^2"]),
    ("merge2x2 no channels", lambda: ops.merge2x2(X[:, :0], GRID, LN_W[:0]), ValueError, ["x", "at least one channel"]),
    ("merge2x2 merge_size 0", lambda: ops.merge2x2(X, GRID, LN_W, merge_size=0), ValueError, ["merge_size", ">= 1"]),
    ("merge2x2 norm", lambda: ops.merge2x2(X, GRID, LN_W, norm="batchnorm"), ValueError, ["norm", "rmsnorm"]),
    ("merge2x2 order", lambda: ops.merge2x2(X, GRID, LN_W, order="zigzag"), ValueError, ["order", "raster"]),
    ("merge2x2 eps", lambda: ops.merge2x2(X, GRID, LN_W, eps=-1.0), ValueError, ["eps", ">= 0"]),
    ("merge2x2 eps nan", lambda: ops.merge2x2(X, GRID, LN_W, eps=float("nan")), ValueError, ["eps", "finite"]),
    ("merge2x2 weight shape", lambda: ops.merge2x2(X, GRID, LN_W[:5]), ValueError, ["weight", "[channels] = [6]"]),
    ("merge2x2 bias shape", lambda: ops.merge2x2(X, GRID, LN_W, LN_B[:2]), ValueError, ["bias", "[channels]"]),
    ("merge2x2 postshuffle weight shape", lambda: ops.merge2x2(X, GRID, LN_W, postshuffle_norm=True), ValueError, ["weight", "[merge_size^2 * channels] = [24]"]),
    ("merge2x2 postshuffle bias shape", lambda: ops.merge2x2(X, GRID, LN_W.repeat(4), LN_B, postshuffle_norm=True), ValueError, ["bias", "[merge_size^2 * channels] = [24]"]),
    ("merge2x2 rmsnorm bias", lambda: ops.merge2x2(X, GRID, LN_W, LN_B, norm="rmsnorm"), ValueError, ["bias must be None", "rmsnorm"]),
    ("merge2x2 raster no grid", lambda: ops.merge2x2(X, None, LN_W, order="raster"), ValueError, ["grid_thw is required", "raster"]),
    ("merge2x2 grid dtype", lambda: ops.merge2x2(X, GRID.float(), LN_W), TypeError, ["grid_thw", "int64"]),
    ("merge2x2 grid shape", lambda: ops.merge2x2(X, GRID[0], LN_W), ValueError, ["grid_thw", "[items, 3]"]),
    ("merge2x2 grid odd", lambda: ops.merge2x2(X, torch.tensor([[2, 1, 4]]), LN_W), ValueError, ["grid_thw row 0", "merge_size = 2"]),
    ("merge2x2 grid negative", lambda: ops.merge2x2(X, torch.tensor([[-2, 2, 2]]), LN_W), ValueError, ["grid_thw row 0", "negative"]),
    ("merge2x2 grid tokens", lambda: ops.merge2x2(X, torch.tensor([[1, 2, 2]]), LN_W), ValueError, ["describes 4 tokens", "x has 8"]),
    ("merge2x2 grid tokens raster", lambda: ops.merge2x2(X, torch.tensor([[3, 2, 2]]), LN_W, order="raster"), ValueError, ["describes 12 tokens"]),
    # ---- interp_pos_embed ----
    ("interp_pos_embed int table", lambda: ops.interp_pos_embed(TABLE.long(), GRID), TypeError, ["table", "float32"]),
    ("interp_pos_embed 1-D table", lambda: ops.interp_pos_embed(TABLE[0], GRID), ValueError, ["table", "2-D"]),
    ("interp_pos_embed table not square", lambda: ops.interp_pos_embed(TABLE[:35], GRID), ValueError, ["side * side rows", "got 35 rows"]),
    ("interp_pos_embed no channels", lambda: ops.interp_pos_embed(TABLE[:, :0], GRID), ValueError, ["table", "at least one channel"]),
    ("interp_pos_embed merge_size 0", lambda: ops.interp_pos_embed(TABLE, GRID, 0), ValueError, ["merge_size", ">= 1"]),
    ("interp_pos_embed bias shape", lambda: ops.interp_pos_embed(TABLE, GRID, 2, LN_B[:5]), ValueError, ["bias", "[channels] = [6]"]),
    ("interp_pos_embed bias dtype", lambda: ops.interp_pos_embed(TABLE, GRID, 2, LN_B.double()), TypeError, ["bias has dtype Double", "table has Float"]),
    ("interp_pos_embed grid dtype", lambda: ops.interp_pos_embed(TABLE, GRID.float()), TypeError, ["grid_thw", "int64"]),
    ("interp_pos_embed grid shape", lambda: ops.interp_pos_embed(TABLE, GRID[0]), ValueError, ["grid_thw", "[items, 3]"]),
    ("interp_pos_embed tokens negative", lambda: ops.interp_pos_embed(TABLE, GRID, tokens=-1), ValueError, ["tokens", ">= 0"]),
    ("interp_pos_embed grid odd", lambda: ops.interp_pos_embed(TABLE, torch.tensor([[1, 2, 3]])), ValueError, ["grid_thw row 0", "merge_size = 2"]),
    ("interp_pos_embed grid negative", lambda: ops.interp_pos_embed(TABLE, torch.tensor([[-1, 2, 2]])), ValueError, ["grid_thw row 0", "negative"]),
    ("interp_pos_embed grid tokens", lambda: ops.interp_pos_embed(TABLE, GRID, tokens=4), ValueError, ["tokens = 4", "describes 8 tokens"]),
    # ---- segment_attention ----
    ("segment_attention groups cover", lambda: ops.segment_attention(QH, QH, QH, ((0, 1, 5),)), ValueError, ["groups cover 5 tokens", "q has 4"]),
    ("segment_attention groups start", lambda: ops.segment_attention(QH, QH, QH, ((0, 1, 2), (3, 1, 1))), ValueError, ["groups[1] = (3, 1, 1)", "previous run ends (token 2)"]),
    ("segment_attention groups length", lambda: ops.segment_attention(QH, QH, QH, ((0, 1, 0), (0, 1, 4))), ValueError, ["groups[0]", "length >= 1"]),
    ("segment_attention k dtype", lambda: ops.segment_attention(QH, QH.half(), QH, ((0, 1, 4),)), TypeError, ["k has dtype Half", "q has Float"]),
    ("segment_attention v shape", lambda: ops.segment_attention(QH, QH, QH[:, :3], ((0, 1, 4),)), ValueError, ["v must have q's shape [2, 4, 16]", "[2, 3, 16]"]),
    ("segment_attention 2-D q", lambda: ops.segment_attention(QH[0], QH[0], QH[0], ((0, 1, 4),)), ValueError, ["q must be 3-D [heads, tokens, head_dim]"]),
    ("segment_attention int q", lambda: ops.segment_attention(QH.int(), QH.int(), QH.int(), ((0, 1, 4),)), TypeError, ["q must be float32", "got Int"]),
    ("segment_attention scale", lambda: ops.segment_attention(QH, QH, QH, ((0, 1, 4),), float("inf")), ValueError, ["scale must be finite", "inf"]),
    # ---- linear_act ----
    ("linear_act act", lambda: ops.linear_act(X, LIN_W, LIN_B, "relu"), ValueError, ["act must be one of", "'quick_gelu'", "got 'relu'"]),
    ("linear_act int x", lambda: ops.linear_act(X.long(), LIN_W), TypeError, ["x", "float32"]),
    ("linear_act 0-D x", lambda: ops.linear_act(X[0, 0], LIN_W), ValueError, ["x must be [..., in_features]", "0-D"]),
    ("linear_act 1-D weight", lambda: ops.linear_act(X, LIN_B), ValueError, ["weight", "2-D [out_features, in_features]"]),
    ("linear_act weight dtype", lambda: ops.linear_act(X, LIN_W.double()), TypeError, ["weight has dtype Double", "x has Float"]),
    ("linear_act in_features", lambda: ops.linear_act(X[:, :5], LIN_W), ValueError, ["in_features = 6", "x has 5 values per row"]),
    ("linear_act bias shape", lambda: ops.linear_act(X, LIN_W, LIN_B[:7]), ValueError, ["bias", "[out_features] = [8]", "[7]"]),
    ("linear_act bias dtype", lambda: ops.linear_act(X, LIN_W, LIN_B.half()), TypeError, ["bias has dtype Half", "x has Float"]),
    ("linear_act_backward preact shape", lambda: torch.ops.vlfuse.linear_act_backward(X, X[:4], "silu"), ValueError, ["preact [4, 6]", "grad_out's shape [8, 6]"]),
    ("linear_act_backward act", lambda: torch.ops.vlfuse.linear_act_backward(X, X, "tanh"), ValueError, ["act must be one of", "got 'tanh'"]),
    ("smart_resize zero", lambda: ops.smart_resize(0, 100), ValueError, ["height and width", "positive"]),
    ("smart_resize aspect", lambda: ops.smart_resize(28, 28 * 300), ValueError, ["aspect ratio"]),
]


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert re.search(r"vlfuse[.:]", message), f"message does not name the vlfuse op: {message!r}"


def test_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.cuda
def test_device_mix_is_rejected():
    qkv = QKV.cuda()
    with pytest.raises(RuntimeError, match="positions is on cpu but qkv is on cuda"):
        ops.rope_qkv(qkv, POS, F.cuda(), 2)
    with pytest.raises(RuntimeError, match="freqs is on cpu"):
        ops.rope_qkv(qkv, POS.cuda(), F, 2)
    with pytest.raises(RuntimeError, match="weight is on"):
        ops.patch_embed(PATCHES.cuda(), WEIGHT)
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        ops.merge2x2(X.cuda(), GRID, LN_W)
    with pytest.raises(RuntimeError, match="frames\\[1\\] is on"):
        ops.patchify([frames().cuda(), frames()])
    with pytest.raises(RuntimeError, match="bias is on cpu but table is on cuda"):
        ops.interp_pos_embed(TABLE.cuda(), GRID, 2, LN_B)
    with pytest.raises(RuntimeError, match="grid_thw is on cuda:0 but table is on cpu"):
        ops.interp_pos_embed(TABLE, GRID.cuda())
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        ops.linear_act(X.cuda(), LIN_W)
    with pytest.raises(RuntimeError, match="bias is on cpu but x is on cuda"):
        ops.linear_act(X.cuda(), LIN_W.cuda(), LIN_B)
    with pytest.raises(RuntimeError, match="k is on cpu but q is on cuda"):
        ops.segment_attention(QH.cuda(), QH, QH, ((0, 1, 4),))


def test_nan_and_inf_propagate():
    qkv = QKV.clone()
    qkv[0, 0] = float("nan")
    qkv[1, 16] = float("inf")
    q, k, v = ops.rope_qkv(qkv, POS, F, 2)
    assert torch.isnan(q[0, 0]).any() and not torch.isfinite(q[1, 1]).all()
    assert torch.isfinite(q[2:]).all() and torch.isfinite(k).all()
    out = ops.patch_embed(torch.full_like(PATCHES, float("nan")), WEIGHT)
    assert torch.isnan(out).all()
    x = X.clone()
    x[1, 2] = float("inf")
    merged = ops.merge2x2(x, GRID, LN_W, LN_B)
    assert torch.isnan(merged[0, 6:12]).all()  # the token's own statistics become NaN: visible, not hidden
    assert torch.isfinite(merged[1]).all() and torch.isfinite(merged[0, :6]).all()


# ---- the same bad calls traced with fake tensors (torch.compile's view) ---------------------------------------
# The fake kernels repeat the C++ checks, so a call that fails in eager fails the same way while torch.compile
# traces it. Left out: checks of tensor values (merge2x2's grid_thw rows; a fake tensor has none, the compiled
# graph's C++ op checks them when it runs) and calls that fail in Python before any op (the vision helpers,
# smart_resize, patchify's empty list).
NOT_OP_CHECKS = ("vision_", "smart_resize", "patchify empty list", "merge2x2 grid odd", "merge2x2 grid negative",
                 "merge2x2 grid tokens", "interp_pos_embed grid odd", "interp_pos_embed grid negative",
                 "interp_pos_embed grid tokens")
FAKE_CASES = [c for c in CASES if not c[0].startswith(NOT_OP_CHECKS)]


def _eager_error(call, exc):
    with pytest.raises(exc) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in FAKE_CASES], ids=[c[0] for c in FAKE_CASES])
def test_fake_kernel_raises_the_eager_error(call, exc, words):
    eager = _eager_error(call, exc)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc) as info:
        call()
    assert str(info.value) == eager


COMPILED_CASES = ["rope_qkv layout", "rope k dtype", "rope_cos_sin sin rows", "patchify height 30", "patch_embed K mismatch",
                  "merge2x2 norm", "merge2x2 grid shape", "interp_pos_embed table not square", "linear_act in_features",
                  "segment_attention groups cover"]


@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_call_raises_the_eager_error(case):
    _, call, exc, _ = next(c for c in CASES if c[0] == case)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(call, backend="eager", fullgraph=True)()
    assert _eager_error(call, exc) in str(info.value)


@pytest.mark.parametrize("k_start, shared", [(64, True), (128, False)])
def test_fake_rope_inplace_sees_views_of_one_buffer(k_start, shared):
    # rope_'s in-place checks read strides and storage offsets, which fake tensors keep: q and k as views of one
    # buffer, overlapping or side by side.
    def call(buffer, positions, freqs):
        ops.rope_(buffer[:128].view(4, 2, 16), buffer[k_start : k_start + 128].view(4, 2, 16), positions, freqs)

    buffer = torch.randn(256)
    eager = _eager_error(lambda: call(buffer, POS, F), ValueError) if shared else call(buffer, POS, F)
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (buffer, POS, F)]
        if shared:
            with pytest.raises(ValueError) as info:
                call(*fakes)
            assert str(info.value) == eager and "q and k share memory" in eager
        else:
            call(*fakes)


G = torch.randn(4, 2, 16)
MERGED = torch.randn(2, 24)
STATS = torch.zeros(8)
BACKWARD_CASES = [
    ("rope_qkv_backward layout", lambda: torch.ops.vlfuse.rope_qkv_backward(G, G, G, POS, F, "sbhd"), ValueError),
    ("rope_qkv_backward heads", lambda: torch.ops.vlfuse.rope_qkv_backward(G, G[:, :1], G, POS, F, "shd"), ValueError),
    ("rope_qkv_backward grad_k dtype", lambda: torch.ops.vlfuse.rope_qkv_backward(G, G.double(), G, POS, F, "shd"), TypeError),
    ("merge2x2_backward grad_out shape", lambda: torch.ops.vlfuse.merge2x2_backward(MERGED[:1], X, GRID, LN_W, STATS, STATS, "layernorm", "merge", 2, [True, True, True]), ValueError),
    ("merge2x2_backward mean dtype", lambda: torch.ops.vlfuse.merge2x2_backward(MERGED, X, GRID, LN_W, STATS.double(), STATS, "layernorm", "merge", 2, [True, True, True]), ValueError),
    ("merge2x2_backward rstd shape", lambda: torch.ops.vlfuse.merge2x2_backward(MERGED, X, GRID, LN_W, STATS, STATS[:4], "layernorm", "merge", 2, [True, True, True]), ValueError),
    ("merge2x2_backward grad_out dtype", lambda: torch.ops.vlfuse.merge2x2_backward(MERGED.double(), X, GRID, LN_W, STATS, STATS, "layernorm", "merge", 2, [True, True, True]), TypeError),
    ("interp_pos_embed_backward side", lambda: torch.ops.vlfuse.interp_pos_embed_backward(X, GRID, 0, 2), ValueError),
    ("interp_pos_embed_backward grad_out dtype", lambda: torch.ops.vlfuse.interp_pos_embed_backward(X.long(), GRID, 6, 2), TypeError),
    ("interp_pos_embed_backward grid shape", lambda: torch.ops.vlfuse.interp_pos_embed_backward(X, GRID[:, :2], 6, 2), ValueError),
]


@pytest.mark.parametrize("call, exc", [c[1:] for c in BACKWARD_CASES], ids=[c[0] for c in BACKWARD_CASES])
def test_fake_backward_kernel_raises_the_eager_error(call, exc):
    eager = _eager_error(call, exc)
    assert re.search(r"vlfuse\.\w+_backward: ", eager), eager
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(exc) as info:
        call()
    assert str(info.value) == eager

"""Temporal patchify ops (vlfuse.ops.patch_embed / patchify / embed_frames, vlfuse.nn.PatchEmbed3d) against the
eager reference and against HF transformers' own Qwen2-VL PatchEmbed and image/video processors."""

from __future__ import annotations

import warnings

import pytest
import torch

import vlfuse  # noqa: F401  (loads the native library)
import vlfuse.reference as ref
from vlfuse.nn import PatchEmbed3d
from vlfuse.ops import CLIP_MEAN, CLIP_STD, embed_frames, patch_embed, patchify, smart_resize

cuda = pytest.mark.cuda

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
P, TP, M = 14, 2, 2
K = 3 * TP * P * P


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_gemm_close(out: torch.Tensor, expected: torch.Tensor, k: int = K) -> None:
    """Two GEMM results in dtype d over the same rounded inputs: each rounds its output once to d (an ulp apart
    at most), and each sums k products in float32 in its own order (a random walk of ~sqrt(k) float32 ulps)."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    scale = float(expected.float().abs().max()) if expected.numel() else 1.0
    atol = (2 * eps(out.dtype) + k**0.5 * eps(torch.float32)) * scale
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 * eps(out.dtype), atol=atol)


def random_frames(t: int, h: int, w: int, dtype=torch.uint8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (t, 3, h, w), dtype=torch.uint8, generator=g)
    return x if dtype == torch.uint8 else (x.to(torch.float32) / 255).to(dtype)


def random_weight(embed: int, dtype: torch.dtype, seed: int = 1, channels: int = 3, tp: int = TP, p: int = P):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(embed, channels, tp, p, p, generator=g) / (channels * tp * p * p) ** 0.5
    return w.to(dtype)


def hf_patch_embed(weight: torch.Tensor):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    e, c, tp, p, _ = weight.shape
    hf = PatchEmbed(patch_size=p, temporal_patch_size=tp, in_channels=c, embed_dim=e)
    with torch.no_grad():
        hf.proj.weight.copy_(weight.float())
    return hf.to(weight.dtype)


def hf_processors():
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image = Qwen2VLImageProcessor(do_resize=False)
    video = Qwen2VLVideoProcessor(do_resize=False, cap_pixels_per_frame=False)
    return image, video


# ---- patch_embed ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_patch_embed_matches_reference(dtype, with_bias):
    n, e = 37, 48
    patches = torch.randn(n, K)
    weight = random_weight(e, dtype)
    bias = torch.randn(e).to(dtype) if with_bias else None
    out = patch_embed(patches, weight, bias)
    assert_gemm_close(out, ref.patch_embed(patches, weight, bias))


@pytest.mark.parametrize("dtype", FLOATS)
def test_patch_embed_matches_hf(dtype):
    n, e = 24, 32
    patches = torch.randn(n, K)  # float32 pixel values, as HF's processor hands them over
    weight = random_weight(e, dtype)
    with torch.no_grad():
        expected = hf_patch_embed(weight)(patches)
    assert_gemm_close(patch_embed(patches, weight), expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_patch_embed_non_contiguous(dtype):
    n, e = 19, 16
    weight = random_weight(e, dtype)
    wide = torch.randn(n, 2 * K)
    transposed = torch.randn(K, n).t()
    for patches in (wide[:, ::2], wide[:, K:], transposed):
        assert not patches.is_contiguous()
        assert_gemm_close(patch_embed(patches, weight), ref.patch_embed(patches.contiguous(), weight))


def test_patch_embed_zero_tokens():
    weight = random_weight(8, torch.float32)
    out = patch_embed(torch.zeros(0, K), weight)
    assert out.shape == (0, 8)
    patches = torch.zeros(0, K, requires_grad=True)
    w = weight.clone().requires_grad_()
    patch_embed(patches, w).sum().backward()
    assert patches.grad.shape == (0, K) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", FLOATS)
def test_patch_embed_row_addend_matches_reference_and_qwen3_embedding(dtype):
    """bias as one row per patch [N, E] (Qwen3-VL's conv bias plus its resampled position table, the GEMM's added
    term): equal to HF's Conv3d followed by adding the rows."""
    n, e = 24, 16
    patches = torch.randn(n, K)
    weight = random_weight(e, dtype)
    rows = torch.randn(n, e).to(dtype)
    out = patch_embed(patches, weight, rows)
    assert_gemm_close(out, ref.patch_embed(patches, weight, rows))
    with torch.no_grad():
        expected = hf_patch_embed(weight)(patches) + rows  # HF adds the table rows after its Conv3d
    assert_gemm_close(out, expected)


# Rows as HF's processors emit them: an image repeats its frame Tp times, and so does an odd video's last pair.
# Items: a 128-row image; a 2-frame video (64 rows of distinct frames); an 8-row image; a 3-frame video (64 rows of
# distinct frames, then 64 of its repeated last frame); a 96-row image. patch_embed folds the Tp taps for runs of
# >= 32 equal-frame rows: rows [0, 128) and [264, 424). The 8-row image is too short a run to fold.
FOLDED_ROWS = (slice(0, 128), slice(264, 424))
UNFOLDED_ROWS = slice(128, 264)


def processor_rows(dtype=torch.float32) -> torch.Tensor:
    frames = [
        random_frames(1, 112, 224, seed=1),
        random_frames(2, 112, 112, seed=2),
        random_frames(1, 28, 56, seed=3),
        random_frames(3, 112, 112, seed=4),
        random_frames(1, 168, 112, seed=5),
    ]
    rows, _ = patchify(frames, patch_size=P, temporal_patch_size=TP, merge_size=M, out_dtype=dtype)
    assert rows.shape[0] == 424
    return rows


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
def test_patch_embed_equal_frames_fold_matches_reference_and_hf(dtype):
    """Rows of equal frames take the folded GEMM; its result stays within a GEMM's rounding of the unfolded one (and
    of HF's Conv3d, within 1e-5 in float32); its rounding error is at most twice HF's own."""
    rows = processor_rows()
    weight = random_weight(48, dtype)
    bias = torch.randn(48).to(dtype)
    out = patch_embed(rows, weight, bias)
    expected = ref.patch_embed(rows, weight, bias)
    assert_gemm_close(out, expected)
    if dtype != torch.float64:
        with torch.no_grad():
            hf = hf_patch_embed(weight)
            hf.proj.bias = torch.nn.Parameter(bias.clone())
            hf_out = hf(rows)
        assert_gemm_close(out, hf_out)
        if dtype == torch.float32:
            torch.testing.assert_close(out, hf_out, rtol=1e-5, atol=1e-5 * float(hf_out.abs().max()))
        exact = rows.to(dtype).double() @ weight.double().reshape(48, -1).t() + bias.double()
        for sel in FOLDED_ROWS:
            err = (out[sel].double() - exact[sel]).abs().max()
            assert err <= 2 * (hf_out[sel].double() - exact[sel]).abs().max() + 1e-12


def test_patch_embed_folds_runs_of_equal_frames_only():
    """In bf16 the folded weight's rounding shows: the runs of equal-frame rows equal the folded GEMM exactly and
    differ from the unfolded one, the other rows (distinct frames, and a run too short to fold) the reverse."""
    dtype = torch.bfloat16
    rows = processor_rows(dtype)
    weight = random_weight(64, dtype)
    bias = torch.randn(64).to(dtype)
    out = patch_embed(rows, weight, bias)
    flat = weight.reshape(64, -1)
    for sel in FOLDED_ROWS:
        assert torch.equal(out[sel], torch.addmm(bias, *folded_operands(rows[sel], weight)))
        assert not torch.equal(out[sel], torch.addmm(bias, rows[sel], flat.t()))
    assert torch.equal(out[UNFOLDED_ROWS], torch.addmm(bias, rows[UNFOLDED_ROWS], flat.t()))
    assert not torch.equal(out[UNFOLDED_ROWS], torch.addmm(bias, *folded_operands(rows[UNFOLDED_ROWS], weight)))


def folded_operands(rows: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 and (W_0 + ... + W_{Tp-1})^T: each row's first frame and the taps summed in float32, rounded once."""
    e, c, tp = weight.shape[:3]
    first = rows.reshape(rows.shape[0], c, tp, -1)[:, :, 0].reshape(rows.shape[0], -1)
    return first, weight.float().sum(2).to(weight.dtype).reshape(e, -1).t()


def test_patch_embed_fold_keeps_float16_taps_whose_sum_overflows():
    """float16 taps that add past 65504 would fold to inf; patch_embed keeps the unfolded GEMM, whose float32
    accumulation holds the sum."""
    rows = processor_rows() / 16
    weight = random_weight(8, torch.float32)
    weight[0, 0, :, 0, 0] = 40000.0  # one pixel's two taps: 80000 folded, while the outputs stay near 10000
    weight = weight.to(torch.float16)
    out = patch_embed(rows, weight)
    assert torch.isfinite(out).all()
    assert_gemm_close(out, ref.patch_embed(rows, weight))


def test_patch_embed_equal_frames_backward_matches_hf():
    """The fold is a forward shortcut: gradients of equal-frame rows reach both taps as HF's Conv3d sends them."""
    rows = processor_rows()
    weight = random_weight(16, torch.float32)
    grad = torch.randn(rows.shape[0], 16)
    hf = hf_patch_embed(weight)
    x_hf = rows.clone().requires_grad_()
    hf(x_hf).backward(grad)
    x, w = rows.clone().requires_grad_(), weight.clone().requires_grad_()
    patch_embed(x, w).backward(grad)
    torch.testing.assert_close(x.grad, x_hf.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, hf.proj.weight.grad, rtol=1e-5, atol=1e-4)


def test_patch_embed_gradcheck():
    c, tp, p, e, n = 3, 2, 2, 5, 7
    patches = torch.randn(n, c * tp * p * p, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(e, c, tp, p, p, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(e, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(patch_embed, (patches, weight, bias))
    assert torch.autograd.gradcheck(patch_embed, (patches, weight, None))
    assert torch.autograd.gradgradcheck(patch_embed, (patches, weight, bias))
    rows = torch.randn(n, e, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(patch_embed, (patches, weight, rows))


@pytest.mark.parametrize("dtype", FLOATS)
def test_patch_embed_backward_matches_hf(dtype):
    n, e = 12, 16
    patches = torch.randn(n, K)
    weight = random_weight(e, dtype)
    grad = torch.randn(n, e).to(dtype)
    hf = hf_patch_embed(weight)
    x_hf = patches.clone().requires_grad_()
    hf(x_hf).backward(grad)
    x = patches.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    patch_embed(x, w).backward(grad)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == dtype
    e_ = eps(dtype)
    torch.testing.assert_close(x.grad, x_hf.grad, rtol=4 * e_, atol=4 * e_ * float(x_hf.grad.abs().max()))
    gw = hf.proj.weight.grad
    torch.testing.assert_close(w.grad.float(), gw.float(), rtol=4 * e_, atol=4 * e_ * float(gw.float().abs().max()))


def test_patch_embed_mixed_dtype_grads():
    """float32 patches into a bfloat16 weight: grads come back in each input's own dtype."""
    patches = torch.randn(6, K, requires_grad=True)
    weight = random_weight(8, torch.bfloat16).requires_grad_()
    bias = torch.zeros(8, dtype=torch.bfloat16, requires_grad=True)
    patch_embed(patches, weight, bias).float().sum().backward()
    assert patches.grad.dtype == torch.float32
    assert weight.grad.dtype == torch.bfloat16 and weight.grad.shape == weight.shape
    assert torch.equal(bias.grad, torch.full((8,), 6.0, dtype=torch.bfloat16))


# ---- patchify vs HF processors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_patchify_matches_hf_video_processor(t):
    _, video = hf_processors()
    frames = random_frames(t, 56, 84, seed=t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = video(videos=[frames], return_tensors="pt")
    patches, grid = patchify(frames)
    assert torch.equal(grid, expected["video_grid_thw"])
    assert patches.dtype == torch.float32
    torch.testing.assert_close(patches, expected["pixel_values_videos"], rtol=0, atol=1e-6)


def test_patchify_matches_hf_video_processor_several_videos():
    _, video = hf_processors()
    videos = [random_frames(3, 56, 28, seed=1), random_frames(4, 28, 84, seed=2), random_frames(1, 84, 56, seed=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = video(videos=videos, return_tensors="pt")
    patches, grid = patchify(videos)
    assert torch.equal(grid, expected["video_grid_thw"])
    torch.testing.assert_close(patches, expected["pixel_values_videos"], rtol=0, atol=1e-6)


def test_patchify_matches_hf_image_processor_one_image():
    image, _ = hf_processors()
    img = random_frames(1, 112, 56, seed=5)[0]
    expected = image(images=[img], return_tensors="pt")
    patches, grid = patchify(img[None])
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(patches, expected["pixel_values"], rtol=0, atol=1e-6)


def test_patchify_matches_hf_image_processor_several_images():
    image, _ = hf_processors()
    imgs = [random_frames(1, h, w, seed=i)[0] for i, (h, w) in enumerate([(56, 84), (28, 28), (112, 56), (56, 84)])]
    expected = image(images=imgs, return_tensors="pt")
    patches, grid = patchify([i[None] for i in imgs])
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(patches, expected["pixel_values"], rtol=0, atol=1e-6)


def test_patchify_float_frames_match_hf():
    """Float frames in [0, 1] are normalized without the 1/255 rescale (HF: do_rescale=False)."""
    image, _ = hf_processors()
    img = random_frames(1, 56, 84, dtype=torch.float32, seed=7)[0]
    expected = image(images=[img], do_rescale=False, return_tensors="pt")
    patches, _ = patchify(img[None])
    torch.testing.assert_close(patches, expected["pixel_values"], rtol=0, atol=1e-6)


# ---- patchify vs the reference ----------------------------------------------------------------------------------


ITEM_SETS = {
    "one_image": [(1, 56, 56)],
    "images_of_different_sizes": [(1, 28, 56), (1, 84, 28), (1, 56, 112)],
    "odd_video_and_image": [(5, 28, 84), (1, 56, 28)],
    "even_video": [(4, 56, 56)],
}


@pytest.mark.parametrize("items", list(ITEM_SETS), ids=list(ITEM_SETS))
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("out_dtype", FLOATS + [torch.float64])
def test_patchify_matches_reference(items, in_dtype, out_dtype):
    frames = [random_frames(*s, dtype=in_dtype, seed=i) for i, s in enumerate(ITEM_SETS[items])]
    patches, grid = patchify(frames, out_dtype=out_dtype)
    expected, expected_grid = ref.patchify(frames, out_dtype=out_dtype)
    assert torch.equal(grid, expected_grid)
    assert patches.dtype == out_dtype
    # Both round the normalized value to out_dtype once; the multiply-add form differs by a few float32 ulps.
    atol = 4 * eps(torch.float32) * 4 if out_dtype in (torch.float32, torch.float64) else 0
    torch.testing.assert_close(patches, expected, rtol=eps(out_dtype), atol=atol)


def test_patchify_non_contiguous_frames():
    base = random_frames(3, 56, 84, seed=11)
    channels_last = base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # [T, H, W, C] memory, decoder layout
    cropped = random_frames(3, 70, 100, seed=12)[:, :, 7:63, 5:89]
    strided = random_frames(3, 56, 168, seed=13)[:, :, :, ::2]
    for frames in (channels_last, cropped, strided):
        assert not frames.is_contiguous()
        patches, _ = patchify(frames)
        expected, _ = ref.patchify([frames.contiguous()])
        torch.testing.assert_close(patches, expected, rtol=eps(torch.float32), atol=1e-6)


def test_patchify_other_geometry():
    """Other patch, temporal and merge sizes, one channel, custom mean/std."""
    frames = random_frames(3, 48, 64, seed=3)[:, :1]
    kw = dict(patch_size=8, temporal_patch_size=3, merge_size=2, mean=(0.5,), std=(0.25,))
    patches, grid = patchify(frames, **kw)
    expected, expected_grid = ref.patchify([frames], **kw)
    assert torch.equal(grid, expected_grid) and patches.shape == (1 * 6 * 8, 1 * 3 * 8 * 8)
    torch.testing.assert_close(patches, expected, rtol=eps(torch.float32), atol=1e-6)


def test_patchify_many_items():
    """More items than one kernel launch takes (they are packed 32 at a time)."""
    frames = [random_frames(1 + i % 3, 28 * (1 + i % 2), 28, seed=i) for i in range(70)]
    patches, grid = patchify(frames, out_dtype=torch.bfloat16)
    expected, expected_grid = ref.patchify(frames, out_dtype=torch.bfloat16)
    assert torch.equal(grid, expected_grid)
    torch.testing.assert_close(patches, expected, rtol=eps(torch.bfloat16), atol=0)


# ---- embed_frames and PatchEmbed3d ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_embed_frames_matches_hf_pipeline(dtype):
    _, video = hf_processors()
    frames = [random_frames(3, 56, 28, seed=1), random_frames(1, 28, 56, seed=2)]
    weight = random_weight(32, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed = video(videos=frames, return_tensors="pt")
    with torch.no_grad():
        expected = hf_patch_embed(weight)(processed["pixel_values_videos"])
    out, grid = embed_frames(frames, weight)
    assert torch.equal(grid, processed["video_grid_thw"])
    # HF rounds the float32 patches to dtype inside PatchEmbed; embed_frames writes them in dtype directly.
    assert_gemm_close(out, expected)


def test_patch_embed_3d_loads_hf_state_dict():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    hf = PatchEmbed(embed_dim=64)
    module = PatchEmbed3d(embed_dim=64)
    assert module.state_dict().keys() == hf.state_dict().keys()
    module.load_state_dict(hf.state_dict())
    patches = torch.randn(8, K)
    with torch.no_grad():
        assert_gemm_close(module(patches), hf(patches))
        # HF's view accepts any leading shape; so does the drop-in.
        assert_gemm_close(module(patches.view(2, 4, K)), hf(patches.view(2, 4, K)))


def test_patch_embed_3d_bias_and_embed_frames():
    module = PatchEmbed3d(embed_dim=16, bias=True)
    assert set(module.state_dict()) == {"proj.weight", "proj.bias"}
    frames = random_frames(2, 56, 28, seed=4)
    out, grid = module.embed_frames(frames)
    patches, _ = ref.patchify([frames])
    with torch.no_grad():
        assert_gemm_close(out, ref.patch_embed(patches, module.proj.weight, module.proj.bias))
        conv = module.proj(patches.view(-1, 3, TP, P, P)).view(-1, 16)
        assert_gemm_close(out, conv)
    assert grid.tolist() == [[1, 4, 2]]


def test_embed_frames_writes_weight_dtype_directly():
    """No float32 copy of the patches for a bf16 weight: the packing writes bf16 rows, which go straight into mm."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.calls.append((str(func), [o.dtype for o in outs if isinstance(o, torch.Tensor)]))
            return out

    frames = random_frames(3, 28, 56)
    with Record() as record:
        embed_frames(frames, random_weight(8, torch.bfloat16))
    ops_called = [(name, dtypes) for name, dtypes in record.calls if name.startswith("vlfuse.")]
    assert ops_called == [("vlfuse.patchify.default", [torch.bfloat16]), ("vlfuse.patch_embed.default", [torch.bfloat16])]


# ---- errors -----------------------------------------------------------------------------------------------------


def test_bad_frame_size_names_nearest_valid_size():
    with pytest.raises(ValueError, match=r"frames\[0\] height 450 .* nearest valid height is 448"):
        patchify(torch.zeros(1, 3, 450, 448, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"frames\[1\] width 30 .* nearest valid width is 28"):
        patchify([torch.zeros(1, 3, 28, 28, dtype=torch.uint8), torch.zeros(2, 3, 28, 30, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"width 10 .* nearest valid width is 28"):
        patchify(torch.zeros(1, 3, 28, 10, dtype=torch.uint8))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: patchify(torch.zeros(3, 28, 28, dtype=torch.uint8)), ValueError, r"must be 4-D \[T, C, H, W\]"),
        (lambda: patchify(torch.zeros(1, 3, 28, 28, dtype=torch.int32)), TypeError, "must be uint8 or float"),
        (lambda: patchify([]), ValueError, "at least one"),
        (lambda: patchify(torch.zeros(0, 3, 28, 28)), ValueError, "at least one frame"),
        (lambda: patchify(torch.zeros(1, 3, 28, 28), mean=(0.5,)), ValueError, "one value per channel"),
        (lambda: patchify(torch.zeros(1, 3, 28, 28), std=(1.0, 0.0, 1.0)), ValueError, "std non-zero"),
        (lambda: patchify(torch.zeros(1, 3, 28, 28), out_dtype=torch.int64), TypeError, "out_dtype must be"),
        (lambda: patchify(torch.zeros(1, 5, 28, 28), mean=(0,) * 5, std=(1,) * 5), ValueError, "1 to 4 channels"),
        (
            lambda: patchify([torch.zeros(1, 3, 28, 28), torch.zeros(1, 3, 28, 28, dtype=torch.uint8)]),
            TypeError,
            "share one dtype",
        ),
        (lambda: patch_embed(torch.zeros(4, 100), random_weight(8, torch.float32)), ValueError, "takes C \\* Tp"),
        (lambda: patch_embed(torch.zeros(4, 2, K), random_weight(8, torch.float32)), ValueError, "must be 2-D"),
        (
            lambda: patch_embed(torch.zeros(4, K), random_weight(8, torch.float32), torch.zeros(7)),
            ValueError,
            r"bias must be \[E\] = \[8\] or one row per patch \[N, E\] = \[4, 8\], got shape \[7\]",
        ),
        (
            lambda: patch_embed(torch.zeros(4, K), random_weight(8, torch.float32), torch.zeros(5, 8)),
            ValueError,
            r"one row per patch \[N, E\] = \[4, 8\], got shape \[5, 8\]",
        ),
        (
            lambda: patch_embed(torch.zeros(4, K), random_weight(8, torch.float32), torch.zeros(8, dtype=torch.float16)),
            TypeError,
            "bias has dtype",
        ),
        (lambda: patch_embed(torch.zeros(4, K, dtype=torch.int64), random_weight(8, torch.float32)), TypeError, "patches must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message) as info:
        call()
    assert "vlfuse." in str(info.value)


def test_smart_resize_matches_hf():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(448, 448), (450, 301), (1080, 1920), (20, 30), (3000, 4000), (28, 5000), (57, 57)]:
        assert smart_resize(h, w) == hf_smart_resize(h, w)
        assert smart_resize(h, w, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28) == hf_smart_resize(
            h, w, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28
        )
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 4000)


# ---- opcheck and compile ----------------------------------------------------------------------------------------


def _opcheck_samples(device="cpu"):
    frames = [random_frames(3, 28, 56, seed=1).to(device), random_frames(1, 56, 28, seed=2).to(device)]
    yield torch.ops.vlfuse.patchify.default, (frames, P, TP, M, list(CLIP_MEAN), list(CLIP_STD), torch.float32)
    yield torch.ops.vlfuse.patchify.default, (frames[:1], P, TP, M, list(CLIP_MEAN), list(CLIP_STD), torch.bfloat16)
    for dtype in (torch.float32, torch.float64):
        patches = torch.randn(9, K, dtype=dtype, device=device, requires_grad=True)
        weight = random_weight(6, dtype).to(device).requires_grad_()
        bias = torch.randn(6, dtype=dtype, device=device, requires_grad=True)
        yield torch.ops.vlfuse.patch_embed.default, (patches, weight, bias)
        yield torch.ops.vlfuse.patch_embed.default, (patches, weight, None)
        rows = torch.randn(9, 6, dtype=dtype, device=device, requires_grad=True)
        yield torch.ops.vlfuse.patch_embed.default, (patches, weight, rows)
    yield torch.ops.vlfuse.patch_embed.default, (torch.randn(5, K, device=device), random_weight(4, torch.bfloat16).to(device), None)


def test_opcheck():
    for op, args in _opcheck_samples():
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    weight = random_weight(16, torch.float32)

    def embed(frames, weight):
        patches, grid = patchify(frames, out_dtype=weight.dtype)
        return patch_embed(patches, weight), grid

    frames = [random_frames(3, 28, 56, seed=1), random_frames(1, 56, 28, seed=2)]
    compiled = torch.compile(embed, fullgraph=True, backend="inductor")
    out, grid = compiled(frames, weight)
    expected, expected_grid = embed(frames, weight)
    assert torch.equal(grid, expected_grid)
    torch.testing.assert_close(out, expected)

    w = weight.clone().requires_grad_()
    patches = torch.randn(8, K, requires_grad=True)
    step = torch.compile(lambda x, w: patch_embed(x, w).square().sum(), fullgraph=True)
    step(patches, w).backward()
    x2, w2 = patches.detach().clone().requires_grad_(), weight.clone().requires_grad_()
    patch_embed(x2, w2).square().sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(patches.grad, x2.grad)


# ---- CUDA ---------------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("in_dtype", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", FLOATS + [torch.float64])
def test_patchify_cuda_matches_cpu(in_dtype, out_dtype):
    frames = [random_frames(*s, dtype=in_dtype, seed=i) for i, s in enumerate([(3, 56, 84), (1, 28, 28), (4, 84, 56)])]
    frames.append(random_frames(3, 56, 84, dtype=in_dtype, seed=9).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))
    cpu, cpu_grid = patchify(frames, out_dtype=out_dtype)
    gpu, gpu_grid = patchify([f.cuda() for f in frames], out_dtype=out_dtype)
    assert gpu.is_cuda and gpu_grid.is_cuda
    assert torch.equal(gpu_grid.cpu(), cpu_grid)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=eps(out_dtype), atol=4 * eps(torch.float32) * 4)


@cuda
@pytest.mark.parametrize("dtype", FLOATS)
def test_patch_embed_cuda_matches_reference(dtype):
    patches = torch.randn(64, K, device="cuda")
    weight = random_weight(32, dtype).cuda().requires_grad_()
    out = patch_embed(patches, weight)
    assert_gemm_close(out.detach().cpu(), ref.patch_embed(patches.cpu(), weight.detach().cpu()))
    out.float().sum().backward()
    assert weight.grad.shape == weight.shape


@cuda
def test_cuda_opcheck_and_embed_frames_vs_hf():
    for op, args in _opcheck_samples("cuda"):
        torch.library.opcheck(op, args)
    frames = [random_frames(3, 56, 28, seed=1), random_frames(1, 28, 56, seed=2)]
    weight = random_weight(32, torch.bfloat16)
    out, grid = embed_frames([f.cuda() for f in frames], weight.cuda())
    cpu, cpu_grid = embed_frames(frames, weight)
    assert torch.equal(grid.cpu(), cpu_grid)
    assert_gemm_close(out.cpu(), cpu)


def test_patch_embed_under_autocast_behaves_like_linear():
    """bf16 autocast: the GEMM runs in bf16, gradients reach the float32 weight and bias as float32."""
    patches = torch.randn(6, 3 * 2 * 14 * 14)
    weight = (torch.randn(8, 3, 2, 14, 14) * 0.02).requires_grad_()
    bias = torch.randn(8).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed(patches, weight, bias)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    want = ref.patch_embed(patches.bfloat16(), weight.detach().bfloat16(), bias.detach().bfloat16())
    torch.testing.assert_close(out, want, rtol=2**-6, atol=2**-6)

"""The Qwen3 generation's vision towers (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, Qwen3-Omni-MoE's encoder,
Qwen4-Exp) on vlfuse: ``VisionTower.from_hf`` and ``vlfuse.patch.auto`` against HF transformers' own towers (small
random models, float32).

Every call holds two images of different sizes and a video with an odd frame count; the grids are non-square and
both smaller (4 patches) and larger (12 patches) than the 6 x 6 position table. Each tower test runs on both
backends: "vlfuse" (the fused ops, interp_pos_embed and merge2x2(postshuffle_norm=True) among them) and "eager".
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import vlfuse.ops
import vlfuse.patch
from vlfuse.models.qwen2_vl.config import Qwen2VLVisionConfig
from vlfuse.models.vision_tower import VisionTower
from vlfuse.nn import PatchMerger, backends

from tolerances import tol

transformers = pytest.importorskip("transformers")

PATCH_DIM = 3 * 2 * 16 * 16
GRID = [[1, 4, 6], [3, 8, 12], [1, 10, 4]]  # image, odd-frame video, non-square image
TOL = dict(rtol=1e-4, atol=1e-4)

# family -> (modeling module key, config class, tower class, has deepstack mergers)
FAMILIES = {
    "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionConfig", "Qwen3VLVisionModel", True),
    "qwen3_vl_moe": ("qwen3_vl_moe", "Qwen3VLMoeVisionConfig", "Qwen3VLMoeVisionModel", True),
    "qwen3_5": ("qwen3_5", "Qwen3_5VisionConfig", "Qwen3_5VisionModel", False),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeVisionConfig", "Qwen3_5MoeVisionModel", False),
    "qwen3_omni_moe": ("qwen3_omni_moe", "Qwen3OmniMoeVisionEncoderConfig", "Qwen3OmniMoeVisionEncoder", True),
    "qwen4_exp": ("qwen4_exp", "Qwen4ExpVisionConfig", "Qwen4ExpVisionModel", False),
}


def _hf_classes(family: str):
    key, config_name, tower_name, _ = FAMILIES[family]
    configuration = importlib.import_module(f"transformers.models.{key}.configuration_{key}")
    modeling = importlib.import_module(f"transformers.models.{key}.modeling_{key}")
    return getattr(configuration, config_name), getattr(modeling, tower_name), modeling


def _hf_tower(family: str, hidden: int = 64, heads: int = 4, depth: int = 3) -> nn.Module:
    config_cls, tower_cls, _ = _hf_classes(family)
    kwargs = dict(
        depth=depth, hidden_size=hidden, intermediate_size=96, num_heads=heads, out_hidden_size=48,
        num_position_embeddings=36,
    )  # fmt: skip
    if FAMILIES[family][3]:
        # block 0 and the last block feed deepstack mergers; the list is out of block order, and 7 >= depth never
        # runs (HF still holds its merger)
        kwargs["deepstack_visual_indexes"] = [depth - 1, 0, 7]
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    tower = tower_cls(config).float().eval()
    with torch.no_grad():
        # HF's init leaves the position table and the norms near their trivial values; these weights make every
        # piece show in the outputs.
        for param in tower.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.5)
    return tower


def _pixels(grid=GRID) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(int(torch.tensor(grid).prod(-1).sum()), PATCH_DIM)


def _assert_outputs_close(got, expected) -> None:
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, **TOL)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **TOL)
    got_taps, expected_taps = getattr(got, "deepstack_features", None), getattr(expected, "deepstack_features", None)
    assert (got_taps is None) == (expected_taps is None)
    for a, b in zip(got_taps or [], expected_taps or [], strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, _hf_tower(request.param)


# ---- the tower engine ------------------------------------------------------------------------------------------


def test_tower_matches_hf(family, backend):
    name, hf = family
    ours = VisionTower.from_hf(hf, backend=backend).eval()
    grid, pixels = torch.tensor(GRID), _pixels()
    with torch.no_grad():
        expected = hf(pixels, grid_thw=grid)
        features = ours.features(pixels, grid, hidden_order="patch")
        chunked = ours.features(pixels, grid, max_tokens=100)  # 24 | 96 x 3 | 40 patches: a chunk per frame or so
    torch.testing.assert_close(features.merged, expected.pooler_output, **TOL)
    torch.testing.assert_close(features.hidden, expected.last_hidden_state, **TOL)
    torch.testing.assert_close(chunked.merged, expected.pooler_output, **TOL)
    taps = getattr(expected, "deepstack_features", None) or []
    assert len(features.deepstack) == len(taps) == (2 if FAMILIES[name][3] else 0)
    for ours_tap, chunk_tap, hf_tap in zip(features.deepstack, chunked.deepstack, taps, strict=True):
        torch.testing.assert_close(ours_tap, hf_tap, **TOL)
        torch.testing.assert_close(chunk_tap, hf_tap, **TOL)
    assert chunked.hidden is None


def test_head_dim_72(backend):
    hf = _hf_tower("qwen3_vl", hidden=144, heads=2, depth=2)
    ours = VisionTower.from_hf(hf, backend=backend).eval()
    assert ours.config.head_dim == 72
    grid, pixels = torch.tensor(GRID), _pixels()
    with torch.no_grad():
        expected = hf(pixels, grid_thw=grid)
        features = ours.features(pixels, grid)
    torch.testing.assert_close(features.merged, expected.pooler_output, **TOL)
    for a, b in zip(features.deepstack, expected.deepstack_features, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.fixture(params=["vlfuse", "eager"])
def backend(request):
    """The tower's backend: a test taking this runs on both."""
    return request.param


@pytest.mark.parametrize("name, hidden, heads", [("qwen3_vl", 144, 2), ("qwen3_omni_moe", 64, 4)])
def test_tower_on_vlfuse_ops(name, hidden, heads):
    hf = _hf_tower(name, hidden=hidden, heads=heads, depth=3)
    ours = VisionTower.from_hf(hf, backend="vlfuse").eval()
    grid, pixels = torch.tensor(GRID), _pixels()
    with torch.no_grad():
        expected = hf(pixels, grid_thw=grid)
        features = ours.features(pixels, grid)
    torch.testing.assert_close(features.merged, expected.pooler_output, **TOL)
    for a, b in zip(features.deepstack, expected.deepstack_features, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_rotary_frequencies_equal_hf():
    """HF's Qwen3 axial rotary (inv_freq over head_dim / 2, [h, w, h, w] halves) is vlfuse's RoPE-2D matrix."""
    hf = _hf_tower("qwen3_vl", hidden=144, heads=2, depth=1)
    for backend in ("eager", "vlfuse"):
        freqs = backends.get(backend).vision_rope_freqs(72, 10000.0, device="cpu")  # [2, 36]
        quarter = 18
        torch.testing.assert_close(freqs[0, :quarter], hf.rotary_pos_emb.inv_freq, rtol=0, atol=0)
        torch.testing.assert_close(freqs[1, quarter:], hf.rotary_pos_emb.inv_freq, rtol=0, atol=0)
        assert not freqs[0, quarter:].any() and not freqs[1, :quarter].any()


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_omni_moe"])
def test_gradients_match_hf(name, backend):
    hf = _hf_tower(name).train()
    ours = VisionTower.from_hf(hf, backend=backend).train()
    grid, pixels = torch.tensor(GRID), _pixels()
    torch.manual_seed(2)
    weights = [torch.randn(pixels.shape[0] // 4, 48) for _ in range(3)]

    def loss(merged, deepstack):
        return sum((t * w).sum() for t, w in zip([merged, *deepstack], weights))

    out = hf(pixels, grid_thw=grid)
    loss(out.pooler_output, out.deepstack_features).backward()
    features = ours.features(pixels, grid)
    loss(features.merged, features.deepstack).backward()
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == {n for n, _ in hf.named_parameters()}
    for param_name, param in hf.named_parameters():
        if param.grad is None:  # the deepstack merger of block 7 (>= depth) never runs, in HF nor here
            assert ours_params[param_name].grad is None, param_name
            continue
        # the gradients reach ~100 here: near-zero elements are judged against the tensor's scale (fp32 sums of
        # 352 tokens in another order)
        scale = param.grad.abs().max().item()
        torch.testing.assert_close(
            ours_params[param_name].grad, param.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{param_name}: {m}"
        )
    assert hf.pos_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, backend", [("qwen3_vl", "vlfuse"), ("qwen3_omni_moe", "eager"), ("qwen3_5", "eager")])
def test_bf16_error_within_hf_own_rounding(name, backend):
    """In bf16 the tower is as close to the fp32 tower as HF's own bf16 tower is (within 1.5x), merged tokens and
    deepstack features alike."""
    hf = _hf_tower(name)
    grid, pixels = torch.tensor(GRID), _pixels()

    def outputs(out):
        return [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]

    with torch.no_grad():
        exact = outputs(hf(pixels, grid_thw=grid))
        hf.to(torch.bfloat16)
        hf_bf16 = outputs(hf(pixels, grid_thw=grid))
        features = VisionTower.from_hf(hf, backend=backend).eval().features(pixels, grid)
    ours_bf16 = [features.merged, *features.deepstack]
    assert all(t.dtype == torch.bfloat16 for t in ours_bf16)
    for ours, theirs, reference in zip(ours_bf16, hf_bf16, exact, strict=True):
        assert (ours.float() - reference).abs().max() <= 1.5 * (theirs.float() - reference).abs().max()


def test_bf16_error_within_hf_own_rounding_on_image_rows():
    """Image rows as HF's processors emit them (each frame twice), so patch_embed folds the Conv3d's temporal taps
    into one weight, rounded to bf16 once more than HF's: the bf16 tower stays within 2x HF's own bf16 error (over
    ten seeds it measured 0.9-1.5x, against 0.8-1.2x on the same rows unfolded)."""
    hf = _hf_tower("qwen3_vl")
    grid = torch.tensor([[1, 8, 8], [1, 6, 10]])
    torch.manual_seed(1)
    rows = int(grid.prod(-1).sum())
    pixels = torch.randn(rows, 3, 1, PATCH_DIM // 6).expand(rows, 3, 2, PATCH_DIM // 6).reshape(rows, PATCH_DIM)
    with torch.no_grad():
        exact = hf(pixels, grid_thw=grid).pooler_output
        hf.to(torch.bfloat16)
        hf_bf16 = hf(pixels, grid_thw=grid).pooler_output
        ours = VisionTower.from_hf(hf).eval().features(pixels, grid).merged
    assert (ours.float() - exact).abs().max() <= 2.0 * (hf_bf16.float() - exact).abs().max()


def test_shared_parameters_are_hf_parameters(family, backend):
    name, hf = family
    shared = VisionTower.from_hf(hf, backend=backend, share_parameters=True)
    ours = dict(shared.named_parameters())
    assert ours.keys() == dict(hf.named_parameters()).keys()
    assert all(ours[n] is p for n, p in hf.named_parameters())


def test_config_from_hf_and_back(family):
    name, hf = family
    config = Qwen2VLVisionConfig.from_hf_dict(hf.config.to_dict())
    assert (config.embed_dim, config.hidden_size, config.patch_size, config.num_position_embeddings) == (64, 48, 16, 36)
    assert config.patch_bias and config.hidden_act == "gelu_pytorch_tanh" and config.mlp_dim == 96
    assert config.param_names == ("qwen3_omni" if name == "qwen3_omni_moe" else "qwen3")
    assert config.deepstack_visual_indexes == ((2, 0, 7) if FAMILIES[name][3] else ())
    assert Qwen2VLVisionConfig.from_hf_dict(config.to_hf_dict()) == config


# ---- the pieces: position table, mergers -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_pos_embed_matches_hf(dtype):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    side, channels = 6, 8
    torch.manual_seed(3)
    table = torch.randn(side * side, channels, dtype=dtype)
    bias = torch.randn(channels, dtype=dtype)
    grid = torch.tensor(GRID + [[2, 2, 2], [1, 6, 6], [1, 14, 2]])
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    exact = (table[indices] * weights[:, :, None]).sum(1)  # HF's own sum (float32), as in its towers
    got = backends.get("eager").interp_pos_embed(table, grid, 2, tokens=int(grid.prod(-1).sum()))
    with_bias = backends.get("eager").interp_pos_embed(table, grid, 2, bias=bias)
    assert got.dtype == with_bias.dtype == dtype and got.shape == (int(grid.prod(-1).sum()), channels)
    torch.testing.assert_close(got, exact.to(dtype), **tol(dtype))
    torch.testing.assert_close(with_bias, (exact + bias.float()).to(dtype), **tol(dtype))


@pytest.mark.parametrize("postshuffle", [False, True])
@pytest.mark.parametrize("names", ["qwen3", "qwen2"])
def test_qwen3_patch_merger_matches_hf(postshuffle, names, backend):
    config_cls, _, modeling = _hf_classes("qwen3_vl" if names == "qwen3" else "qwen3_omni_moe")
    merger_cls = modeling.Qwen3VLVisionPatchMerger if names == "qwen3" else modeling.Qwen3OmniMoeVisionPatchMerger
    config = config_cls(hidden_size=16, out_hidden_size=24, spatial_merge_size=2)
    torch.manual_seed(4)
    hf = merger_cls(config, use_postshuffle_norm=postshuffle).float()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.5)
    ours = PatchMerger(24, 16, postshuffle_norm=postshuffle, names=names, backend=backend)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(40, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), **TOL)


# ---- vlfuse.patch ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "vlfuse"])
@pytest.mark.parametrize("tower", [True, False], ids=["tower", "pieces"])
def test_auto_patch_matches_hf_and_reverts(family, tower, backend):
    name, hf = family
    grid, pixels = torch.tensor(GRID), _pixels()
    state = {k: (v.clone(), v.data_ptr()) for k, v in hf.state_dict().items()}
    with torch.no_grad():
        before = hf(pixels, grid_thw=grid)
        assert vlfuse.patch.auto(hf, tower=tower, backend=backend) is hf
        try:
            after = hf(pixels, grid_thw=grid)
        finally:
            vlfuse.patch.revert(hf)
        reverted = hf(pixels, grid_thw=grid)
    assert "_vlfuse_tower" not in hf.__dict__
    _assert_outputs_close(after, before)
    assert type(after) is type(before)
    assert torch.equal(reverted.pooler_output, before.pooler_output)
    assert torch.equal(reverted.last_hidden_state, before.last_hidden_state)
    for a, b in zip(reverted.get("deepstack_features") or [], before.get("deepstack_features") or [], strict=True):
        assert torch.equal(a, b)
    assert not any("forward" in m.__dict__ or "_vlfuse_backend" in m.__dict__ for m in hf.modules())
    assert list(hf.state_dict()) == list(state)
    for key, value in hf.state_dict().items():
        assert torch.equal(value, state[key][0]) and value.data_ptr() == state[key][1], key


def test_named_entry_patches_each_piece_and_only_those(family, backend):
    name, hf = family
    _, _, modeling = _hf_classes(name)
    entry = getattr(vlfuse.patch, name)
    entry(hf, rotary=False, merger=False, backend=backend)
    try:
        patched = {type(m).__name__ for m in hf.modules() if "forward" in m.__dict__}
        assert patched == {vlfuse.patch._FAMILIES[name].patch_embed}
        grid, pixels = torch.tensor(GRID), _pixels()
        with torch.no_grad():
            got = hf(pixels, grid_thw=grid).pooler_output
    finally:
        vlfuse.patch.revert(hf)
    with torch.no_grad():
        torch.testing.assert_close(got, hf(pixels, grid_thw=grid).pooler_output, **TOL)


def test_class_patch_and_revert(backend):
    _, tower_cls, modeling = _hf_classes("qwen3_vl")
    originals = (tower_cls.forward, modeling.Qwen3VLVisionPatchMerger.forward, modeling.apply_rotary_pos_emb_vision)
    hf = _hf_tower("qwen3_vl")
    grid, pixels = torch.tensor(GRID), _pixels()
    with torch.no_grad():
        before = hf(pixels, grid_thw=grid)
        assert vlfuse.patch.qwen3_vl(tower=True, backend=backend) is None
        try:
            assert modeling.apply_rotary_pos_emb_vision is not originals[2]
            after = hf(pixels, grid_thw=grid)
        finally:
            vlfuse.patch.revert()
    restored = (tower_cls.forward, modeling.Qwen3VLVisionPatchMerger.forward, modeling.apply_rotary_pos_emb_vision)
    assert restored == originals
    assert not hasattr(tower_cls, "_vlfuse_backend")
    _assert_outputs_close(after, before)


def test_auto_on_an_unsupported_model_names_the_classes():
    with pytest.raises(ValueError, match=r"auto: Linear contains no supported vision module .*"
                                         r"Qwen2VisionTransformerPretrainedModel.*Qwen3VLVisionModel.*"
                                         r"Qwen3OmniMoeVisionEncoder.*Qwen4ExpVisionPatchMerger"):  # fmt: skip
        vlfuse.patch.auto(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Qwen3.5 vision module"):
        vlfuse.patch.qwen3_5(_hf_tower("qwen3_vl", depth=1))
    with pytest.raises(ValueError, match="backend must be one of"):
        vlfuse.patch.qwen3_vl(_hf_tower("qwen3_vl", depth=1), backend="cuda")


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors(backend):
    ours = VisionTower.from_hf(_hf_tower("qwen3_vl", depth=1), backend=backend)
    pixels = _pixels()
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        ours(pixels[:15], [[1, 3, 5]])
    with pytest.raises(ValueError, match=r"pixel_values must be \[patches, 1536\] \(C \* Tp \* P \* P\)"):
        ours(pixels[:, :1176], GRID)
    with pytest.raises(ValueError, match="describes 352 patches but pixel_values has 351"):
        ours(pixels[:-1], GRID)
    eager = backends.get("eager")
    with pytest.raises(ValueError, match=r"table must be \[S \* S, C\] \(a square grid\), got \(35, 64\)"):
        eager.interp_pos_embed(torch.zeros(35, 64), torch.tensor(GRID))
    with pytest.raises(ValueError, match="multiples of merge_size 2"):
        eager.interp_pos_embed(torch.zeros(36, 64), torch.tensor([[1, 4, 5]]))
    with pytest.raises(ValueError, match="describes 352 patches but tokens is 350"):
        eager.interp_pos_embed(torch.zeros(36, 64), torch.tensor(GRID), tokens=350)
    with pytest.raises(ValueError, match="num_position_embeddings 35 must be a square"):
        Qwen2VLVisionConfig(num_position_embeddings=35).validate()


def test_compile_fullgraph_no_breaks():
    """The Qwen3-VL tower (position table, deepstack mergers) compiles without a graph break, on vlfuse's ops, and
    one graph serves images of any size (sizes smaller and larger than the table)."""
    import torch._dynamo.testing

    ours = VisionTower.from_hf(_hf_tower("qwen3_vl", depth=2)).eval()
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(ours.features, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for grid in ([[1, 8, 12]], [[1, 4, 6]], [[1, 6, 10]], [[1, 12, 4]]):
            plan = ours.plan(grid)
            got, expected = compiled(_pixels(grid), plan=plan), ours.features(_pixels(grid), plan=plan)
            torch.testing.assert_close(got.merged, expected.merged, **TOL)
            for a, b in zip(got.deepstack, expected.deepstack, strict=True):
                torch.testing.assert_close(a, b, **TOL)
    assert counter.frame_count == 1
    explained = torch._dynamo.explain(ours.features)(_pixels(), plan=ours.plan(GRID))
    assert explained.graph_break_count == 0

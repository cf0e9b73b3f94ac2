"""The vision tower engine (vlfuse.models.VisionTower) against HF transformers' own Qwen2-VL and Qwen2.5-VL towers
(same weights, float32): mixed image sizes, odd-frame video, windowed and full-attention blocks; the plan, chunked
encoding, torch.compile with no graph breaks and no recompiles across sizes, gradients, and the tower=True patch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlfuse.patch
from vlfuse.models.vision_plan import VisionPlan
from vlfuse.models.vision_tower import VisionTower
from vlfuse.nn.attention import SegmentLayout, segment_attention
from vlfuse.ops import sdpa_segment_attention

transformers = pytest.importorskip("transformers")

PATCH_DIM = 3 * 2 * 14 * 14
# Two images of different sizes (one non-square), a video with an odd frame count, and a repeated size placed
# apart from its twin, so the plan must move whole frames to batch equal lengths.
GRIDS = {
    "one_image": [[1, 8, 12]],
    "mixed": [[1, 4, 6], [3, 4, 4], [1, 8, 12], [1, 4, 6], [1, 6, 2]],
}


def _hf_tower(family: str):
    torch.manual_seed(0)
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as Tower

        config = Qwen2VLVisionConfig(depth=3, embed_dim=64, hidden_size=48, num_heads=4, mlp_ratio=2)
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Tower,
        )

        # window 56 px = 2 x 2 merged tokens: the 8 x 12 image splits into 6 windows, the 6 x 2 one into edge
        # windows; blocks 0 and 2 windowed, block 1 full.
        config = Qwen2_5_VLVisionConfig(
            depth=3, hidden_size=64, intermediate_size=80, num_heads=4, out_hidden_size=48, window_size=56,
            fullatt_block_indexes=[1],
        )  # fmt: skip
    config._attn_implementation = "sdpa"
    tower = Tower(config).float().eval()
    with torch.no_grad():
        for param in tower.parameters():
            param.normal_(0.0, 0.2 if param.dim() > 1 else 0.5)
    return tower


def _hf_merged(hf, pixels, grid):
    out = hf(pixels, grid_thw=grid)
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _pixels(grid) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(int(torch.tensor(grid).prod(-1).sum()), PATCH_DIM)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def towers(request):
    hf = _hf_tower(request.param)
    return request.param, hf, VisionTower.from_hf(hf).eval()


@pytest.mark.parametrize("case", GRIDS)
def test_engine_matches_hf_tower(towers, case):
    family, hf, ours = towers
    grid = torch.tensor(GRIDS[case])
    pixels = _pixels(GRIDS[case])
    with torch.no_grad():
        expected = _hf_merged(hf, pixels, grid)
        torch.testing.assert_close(ours(pixels, grid), expected, rtol=1e-4, atol=1e-4)
        # the same through a list grid, a given plan, and chunks of whole frames
        torch.testing.assert_close(ours(pixels, GRIDS[case]), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(pixels, plan=ours.plan(grid)), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(pixels, grid, max_tokens=40), expected, rtol=1e-4, atol=1e-4)


def test_eager_backend_matches(towers):
    family, hf, ours = towers
    eager = VisionTower(ours.config, backend="eager").eval()
    eager.load_state_dict(ours.state_dict())
    pixels = _pixels(GRIDS["mixed"])
    with torch.no_grad():
        torch.testing.assert_close(eager(pixels, GRIDS["mixed"]), ours(pixels, GRIDS["mixed"]), rtol=1e-4, atol=1e-4)


def test_gradients_match_hf(towers):
    family, hf, ours = towers
    grid = torch.tensor(GRIDS["mixed"])
    pixels = _pixels(GRIDS["mixed"])
    weight = torch.randn(pixels.shape[0] // 4, ours.config.hidden_size)
    for model, merged in ((hf, lambda: _hf_merged(hf, pixels, grid)), (ours, lambda: ours(pixels, grid))):
        model.zero_grad()
        (merged() * weight).sum().backward()
    ours_grads = dict(ours.named_parameters())
    for name, param in hf.named_parameters():
        torch.testing.assert_close(ours_grads[name].grad, param.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_patched_hf_tower_equals_unpatched_and_reverts(towers):
    family, hf, _ = towers
    grid = torch.tensor(GRIDS["mixed"])
    pixels = _pixels(GRIDS["mixed"])
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    with torch.no_grad():
        before = hf(pixels, grid_thw=grid)
        getattr(vlfuse.patch, family)(hf, tower=True)
        try:
            after = hf(pixels, grid_thw=grid)
        finally:
            vlfuse.patch.revert(hf)
        reverted = hf(pixels, grid_thw=grid)
    torch.testing.assert_close(after.pooler_output, before.pooler_output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(reverted.pooler_output, before.pooler_output)
    assert hf.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in hf.state_dict().items())


def test_shared_parameters_are_hf_parameters(towers):
    family, hf, _ = towers
    shared = VisionTower.from_hf(hf, share_parameters=True)
    ours = dict(shared.named_parameters())
    assert all(ours[name] is param for name, param in hf.named_parameters())


def test_plan_groups_equal_lengths_and_needs_no_mask(monkeypatch):
    plan = VisionPlan.build(GRIDS["mixed"], merge_size=2)
    # frames of 24, 16 x 3, 96, 24, 12 tokens -> sorted 96, 24, 24, 16, 16, 16, 12: one run per distinct length
    assert plan.full.groups == ((0, 1, 96), (96, 2, 24), (144, 3, 16), (192, 1, 12))
    assert plan.tokens == 204 and plan.unit_order is not None
    assert torch.equal(plan.unit_order[plan.unit_restore], torch.arange(51))
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), args, kwargs))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = torch.randn(3, 2, plan.tokens, 8).unbind(0)
    out = sdpa_segment_attention(q, k, v, plan.full.groups)
    assert [c[0] for c in calls] == [(1, 2, 96, 8), (2, 2, 24, 8), (3, 2, 16, 8), (1, 2, 12, 8)]
    assert all(not args and kwargs.get("attn_mask") is None for _, args, kwargs in calls)  # no mask
    expected = torch.cat(
        [sdpa(q[:, s:e], k[:, s:e], v[:, s:e]).transpose(0, 1).reshape(e - s, 16)
         for s, e in [(0, 96), (96, 120), (120, 144), (144, 160), (160, 176), (176, 192), (192, 204)]]
    )  # fmt: skip
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(segment_attention(q, k, v, plan.full), expected)


def test_segment_layout_from_cu_seqlens():
    layout = SegmentLayout.from_cu_seqlens(torch.tensor([0, 4, 8, 8, 11, 14, 20], dtype=torch.int32))
    assert layout == SegmentLayout(((0, 2, 4), (8, 2, 3), (14, 1, 6)), 20)
    with pytest.raises(ValueError, match="cover 20 tokens but q has 21"):
        segment_attention(*torch.randn(3, 1, 21, 4).unbind(0), layout)


def test_chunks_cover_whole_frames():
    plan = VisionPlan.build([[5, 4, 4], [1, 8, 8]], merge_size=2, max_tokens=40)
    assert [(a, b) for a, b, _ in plan.chunks] == [(0, 32), (32, 64), (64, 80), (80, 144)]
    assert [chunk.grid for _, _, chunk in plan.chunks] == [((2, 4, 4),), ((2, 4, 4),), ((1, 4, 4),), ((1, 8, 8),)]


def test_bad_inputs_give_clear_errors(towers):
    family, hf, ours = towers
    pixels = _pixels(GRIDS["mixed"])
    with pytest.raises(ValueError, match="describes 204 patches but pixel_values has 200"):
        ours(pixels[:-4], GRIDS["mixed"])
    with pytest.raises(ValueError, match="multiples of the merge size 2"):
        ours(pixels, [[1, 3, 84]])
    with pytest.raises(ValueError, match=r"pixel_values must be \[patches, 1176\]"):
        ours(pixels[:, :100], GRIDS["mixed"])
    with pytest.raises(ValueError, match="describes 96 patches"):
        ours(pixels, plan=ours.plan(GRIDS["one_image"]))
    other = VisionPlan.build(GRIDS["mixed"], merge_size=2, window_units=0 if family == "qwen2_5_vl" else 2)
    with pytest.raises(ValueError, match="build it with tower.plan"):
        ours(pixels, plan=other)
    with pytest.raises(ValueError, match="grid_thw must be"):
        ours(pixels, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="max_tokens must be a positive"):
        ours(pixels, GRIDS["mixed"], max_tokens=0)


def _compile_sizes(family: str) -> list:
    """Grids that one dynamic graph serves: one image each, of different sizes."""
    if family == "qwen2_vl":
        return [[[1, 8, 12]], [[1, 4, 6]], [[1, 6, 10]], [[1, 12, 4]]]
    # A windowed tower's graph has one SDPA call per distinct window size, so sizes that cut windows at the edges
    # differently compile once per count of sizes; these all tile into several whole windows (a single column of
    # windows keeps the patch order, a plan without a reorder: another graph).
    return [[[1, 8, 12]], [[1, 4, 8]], [[1, 4, 12]], [[1, 8, 16]]]


def test_compile_fullgraph_no_breaks_no_recompiles(towers):
    import torch._dynamo.testing

    family, hf, ours = towers
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(ours, backend=counter, fullgraph=True, dynamic=True)
    sizes = _compile_sizes(family)
    with torch.no_grad():
        for grid in sizes:
            pixels = _pixels(grid)
            plan = ours.plan(grid)
            torch.testing.assert_close(compiled(pixels, plan=plan), ours(pixels, plan=plan), rtol=1e-4, atol=1e-4)
    # one graph for all of them: the plan's integers are symbolic; only a different count of distinct segment
    # lengths (a different number of SDPA calls) makes another
    assert counter.frame_count == 1
    explained = torch._dynamo.explain(ours)(_pixels(sizes[0]), plan=ours.plan(sizes[0]))
    assert explained.graph_break_count == 0


def test_compile_training_fullgraph_gradients(towers):
    """Forward and backward of the compiled tower (AOTAutograd traces the backward too): no graph breaks, no
    recompiles over the sizes, every parameter's gradient equal to eager's."""
    import torch._dynamo.testing

    family, hf, _ = towers
    tower = VisionTower.from_hf(hf).train()
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(tower, backend=counter, fullgraph=True, dynamic=True)
    first_compile = None
    for grid in _compile_sizes(family)[:3]:
        pixels = _pixels(grid)
        plan = tower.plan(grid)
        grads = []
        for forward in (compiled, tower):
            tower.zero_grad(set_to_none=True)
            forward(pixels, plan=plan).square().mean().backward()
            grads.append([p.grad.clone() for p in tower.parameters()])
        for (name, _), got, expected in zip(tower.named_parameters(), *grads):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
        first_compile = first_compile or counter.frame_count
    # (AOTAutograd may trace the first call twice: dynamo restarts once it has turned float attributes into
    # tensors); no other size compiles again
    assert counter.frame_count == first_compile


@pytest.mark.cuda
def test_cuda_graph_capture_of_a_planned_forward(towers):
    family, hf, ours = towers
    tower = VisionTower.from_hf(hf).cuda().eval()
    grid = GRIDS["mixed"]
    pixels = _pixels(grid).cuda()
    plan = tower.plan(grid)
    static_in = pixels.clone()
    with torch.no_grad():
        expected = tower(pixels, plan=plan)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            tower(static_in, plan=plan)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = tower(static_in, plan=plan)
        static_in.copy_(pixels * 0.5)
        graph.replay()
        torch.testing.assert_close(static_out, tower(pixels * 0.5, plan=plan), rtol=1e-4, atol=1e-4)
    assert expected.shape == static_out.shape

"""vlfuse.patch: HF transformers' Qwen2-VL / Qwen2.5-VL and the Qwen3 generation's whole models (Qwen3-VL,
Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, Qwen3-Omni-MoE's thinker, Qwen4-Exp) run on vlfuse ops, patched vs unpatched on
the same inputs.

Small random models (no network), two images of different grids and a video with an odd number of temporal
patches in one prompt. Qwen2.5-VL's config makes its window attention reorder tokens (windows smaller than the
second image) and mixes windowed and full-attention blocks.

transformers versions: the venv has 5.18; `make test-hf4` runs this file against transformers 4.57.6, installed with
pip --target into build/hf4 and put first on PYTHONPATH, so it reuses the venv's torch instead of a second venv.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import pathlib
import sys

import pytest
import torch
from packaging.version import Version
from torch import nn

import vlfuse
import vlfuse.patch

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, VISION_START, VISION_END = 120, 121, 122, 123
IMAGE_GRIDS = [[1, 4, 6], [1, 8, 12]]
VIDEO_GRIDS = [[3, 4, 4]]  # odd number of temporal patches
PATCH_DIM = 3 * 2 * 14 * 14

FAMILIES = {
    "qwen2_vl": (vlfuse.patch.qwen2_vl, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": (vlfuse.patch.qwen2_5_vl, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}
MODELING = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "PatchEmbed", "PatchMerger"),
    "qwen2_5_vl": (
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        "Qwen2_5_VisionPatchEmbed",
        "Qwen2_5_VLPatchMerger",
    ),
}


def _config(family: str):
    text = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
    else:
        # window_size 56 px = 2x2 merged tokens per window: the 8x12 image splits into 6 windows. Block 0 windowed,
        # block 1 full.
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, window_size=56,
            fullatt_block_indexes=[1],
        )  # fmt: skip
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)  # fmt: skip
    return getattr(transformers, FAMILIES[family][1])(text_config=text, vision_config=vision, **ids, **text)


def _model(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[family][2])(_config(family)).float().eval()
    with torch.no_grad():
        # HF's init (std 0.02) leaves the vision features nearly invisible in the logits; larger weights make the
        # logits depend on every vision piece.
        for name, param in model.named_parameters():
            if param.dim() > 1 or "ln_q" in name:
                param.normal_(0.0, 0.2)
    return model


def _inputs() -> dict:
    torch.manual_seed(1)
    grids = torch.tensor(IMAGE_GRIDS), torch.tensor(VIDEO_GRIDS)
    ids, types = [5, 6], [0, 0]
    for grid, token, kind in [(g, IMAGE, 1) for g in IMAGE_GRIDS] + [(g, VIDEO, 2) for g in VIDEO_GRIDS]:
        count = grid[0] * grid[1] * grid[2] // 4
        ids += [VISION_START] + [token] * count + [VISION_END, 7]
        types += [0] + [kind] * count + [0, 0]
    inputs = dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=torch.randn(int(grids[0].prod(-1).sum()), PATCH_DIM),
        image_grid_thw=grids[0],
        pixel_values_videos=torch.randn(int(grids[1].prod(-1).sum()), PATCH_DIM),
        video_grid_thw=grids[1],
    )
    # transformers 5.x asks for the token types when grids are passed; 4.57 derives them itself.
    model_forward = transformers.Qwen2VLModel.forward
    if "mm_token_type_ids" in inspect.signature(model_forward).parameters:
        inputs["mm_token_type_ids"] = torch.tensor([types])
    return inputs


def _vision(model: nn.Module) -> nn.Module:
    return model.model.visual


def _vision_out(model: nn.Module, inputs: dict) -> torch.Tensor:
    # The merged tokens handed to the LLM, images then video. The tower returns a tensor in 4.57 and an output
    # object (merged tokens in pooler_output) in 5.x.
    outs = []
    for pixels, grid in ((inputs["pixel_values"], inputs["image_grid_thw"]),
                         (inputs["pixel_values_videos"], inputs["video_grid_thw"])):  # fmt: skip
        out = _vision(model)(pixels, grid_thw=grid)
        outs.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return torch.cat(outs)


@pytest.fixture(autouse=True)
def _undo_class_patches():
    yield
    vlfuse.patch.revert()


@pytest.fixture
def ops_calls(monkeypatch):
    """Counts the calls of the three vlfuse ops the patch routes through (proof that the patched path ran)."""
    calls = {"patch_embed": 0, "rope_cos_sin": 0, "merge2x2": 0}

    def counting(name):
        op = getattr(vlfuse.ops, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(vlfuse.ops, name, counting(name))
    return calls


def _state(model: nn.Module) -> dict:
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def _assert_state_unchanged(model: nn.Module, before: dict, same_storage: bool = True) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, (value, ptr) in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].data_ptr() == ptr or not same_storage, key


# ---- forward parity, state dict, revert ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_instance_patch_logits_match_and_revert(family, ops_calls):
    model, inputs = _model(family), _inputs()
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_vision = _vision_out(model, inputs)
    before = _state(model)

    assert FAMILIES[family][0](model) is model
    _assert_state_unchanged(model, before)
    with torch.no_grad():
        logits = model(**inputs).logits
        vision = _vision_out(model, inputs)
    assert ops_calls["patch_embed"] > 0 and ops_calls["merge2x2"] > 0
    assert ops_calls["rope_cos_sin"] >= 2 * _vision(model).config.depth
    torch.testing.assert_close(vision, ref_vision, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    _assert_state_unchanged(model, before)

    vlfuse.patch.revert(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    calls = dict(ops_calls)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
    assert ops_calls == calls


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_patch_logits_match_and_revert(family):
    """tower=True: the whole vision tower runs on vlfuse's engine, on HF's own Parameter objects."""
    model, inputs = _model(family), _inputs()
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_vision = _vision_out(model, inputs)
    before = _state(model)
    FAMILIES[family][0](model, tower=True)
    with torch.no_grad():
        logits = model(**inputs).logits
        vision = _vision_out(model, inputs)
    engine = _vision(model).__dict__["_vlfuse_tower"]
    assert all(a is b for a, b in zip(engine.parameters(), _vision(model).parameters()))
    torch.testing.assert_close(vision, ref_vision, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    _assert_state_unchanged(model, before)
    vlfuse.patch.revert(model)
    assert "_vlfuse_tower" not in _vision(model).__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_class_patch_applies_to_models_built_after_and_reverts(family, ops_calls):
    module_name, embed_name, merger_name = MODELING[family]
    modeling = sys.modules[module_name]
    originals = (
        getattr(modeling, embed_name).forward,
        getattr(modeling, merger_name).forward,
        modeling.apply_rotary_pos_emb_vision,
    )
    reference, inputs = _model(family), _inputs()
    with torch.no_grad():
        ref_logits = reference(**inputs).logits

    assert FAMILIES[family][0]() is None
    patched = (
        getattr(modeling, embed_name).forward,
        getattr(modeling, merger_name).forward,
        modeling.apply_rotary_pos_emb_vision,
    )
    assert all(p is not o for p, o in zip(patched, originals))
    model = _model(family)  # built after the patch, same seed: same weights
    _assert_state_unchanged(model, _state(reference), same_storage=False)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert min(ops_calls.values()) > 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)

    vlfuse.patch.revert()
    restored = (
        getattr(modeling, embed_name).forward,
        getattr(modeling, merger_name).forward,
        modeling.apply_rotary_pos_emb_vision,
    )
    assert all(r is o for r, o in zip(restored, originals))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_match(family):
    inputs = _inputs()
    grads = []
    for patch in (False, True):
        model = _model(family).train()
        if patch:
            FAMILIES[family][0](model)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    ref, got = grads
    assert list(got) == list(ref)
    assert any("patch_embed" in n for n in ref) and any("merger" in n for n in ref)
    for name in ref:
        # fp32 throughout; the fused ops sum in another order than Conv3d / LayerNorm / HF's rotary.
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_tokens_identical(family):
    model, inputs = _model(family), _inputs()
    prompt = inputs["input_ids"].shape[1]
    # 4.57 takes no mm_token_type_ids in generate's later steps either; 5.x extends them itself.
    reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    FAMILIES[family][0](model)
    tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert reference.shape[1] > prompt
    assert torch.equal(tokens, reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_vision_tower_error_within_hf_own_rounding(family):
    """In bf16, the patched tower is as close to the fp32 tower as HF's own bf16 tower is (within 1.5x)."""
    model, inputs = _model(family), _inputs()
    with torch.no_grad():
        exact = _vision_out(model, inputs)
        model.to(torch.bfloat16)
        hf_error = (_vision_out(model, inputs).float() - exact).abs().max()
        FAMILIES[family][0](model)
        error = (_vision_out(model, inputs).float() - exact).abs().max()
    assert error <= 1.5 * hf_error


# ---- pieces, families, errors ----------------------------------------------------------------------------------


def test_pieces_can_be_chosen(ops_calls):
    model, inputs = _model("qwen2_vl"), _inputs()
    vlfuse.patch.qwen2_vl(model, patch_embed=False, merger=False)
    with torch.no_grad():
        _vision_out(model, inputs)
    assert ops_calls["rope_cos_sin"] > 0 and ops_calls["patch_embed"] == 0 and ops_calls["merge2x2"] == 0


def test_patching_the_vision_tower_alone(ops_calls):
    model, inputs = _model("qwen2_5_vl"), _inputs()
    with torch.no_grad():
        ref = _vision_out(model, inputs)
        vlfuse.patch.qwen2_5_vl(_vision(model))
        torch.testing.assert_close(_vision_out(model, inputs), ref, rtol=1e-4, atol=1e-4)
    assert min(ops_calls.values()) > 0


def test_instance_patch_leaves_other_models_alone(ops_calls):
    patched, other, inputs = _model("qwen2_vl"), _model("qwen2_vl"), _inputs()
    vlfuse.patch.qwen2_vl(patched)
    with torch.no_grad():
        _vision_out(other, inputs)
    assert ops_calls == {"patch_embed": 0, "rope_cos_sin": 0, "merge2x2": 0}


def test_wrong_family_is_a_clear_error():
    with pytest.raises(ValueError, match="no Qwen2-VL vision module"):
        vlfuse.patch.qwen2_vl(_model("qwen2_5_vl"))
    with pytest.raises(ValueError, match="no Qwen2.5-VL vision module"):
        vlfuse.patch.qwen2_5_vl(nn.Linear(2, 2))


def test_missing_transformers_is_a_clear_import_error(monkeypatch):
    for name in list(sys.modules):
        if name == "transformers" or name.startswith("transformers."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="needs HF transformers"):
        vlfuse.patch.qwen2_vl()
    with pytest.raises(ImportError, match="needs HF transformers"):
        vlfuse.patch.qwen2_5_vl(nn.Linear(2, 2))


# ---- the standalone-module route: examples/timm_rope2d.py --------------------------------------------------------


def test_timm_vit_to_rope2d_example(capsys):
    pytest.importorskip("timm")
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "timm_rope2d.py"
    spec = importlib.util.spec_from_file_location("timm_rope2d", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # checks vlfuse vs plain PyTorch inside, with two images of different sizes, and runs a backward
    example.main(["--embed-dim", "64", "--depth", "2", "--heads", "2", "--out-dim", "32", "--sizes", "64x64,32x96"])
    assert "output (7, 32)" in capsys.readouterr().out  # 4x4 and 2x6 patches -> 4 + 3 merged tokens


# ---- vlfuse.patch.auto, and the Qwen3 generation (a whole Qwen3-VL model) -----------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_patches_what_the_named_entry_patches(family, ops_calls):
    model, inputs = _model(family), _inputs()
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    assert vlfuse.patch.auto(model) is model
    patched = sorted(type(m).__name__ for m in model.modules() if "forward" in m.__dict__)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert min(ops_calls.values()) > 0
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    vlfuse.patch.revert(model)
    FAMILIES[family][0](model)
    assert sorted(type(m).__name__ for m in model.modules() if "forward" in m.__dict__) == patched
    vlfuse.patch.revert(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


# The Qwen3 generation as whole small models: 16-pixel patches with a Conv3d bias, a learned 4 x 4 position table
# (the 8 x 12 image is larger, the 4 x 4 video smaller), deepstack features from both vision blocks added to the
# LLM's first two layers where the family has them. A video's frames are separate groups (timestamp, vision start,
# frame, vision end), as Qwen3-VL's processor writes them, except in Qwen3-Omni-MoE, whose thinker takes the whole
# video as one group timed by video_second_per_grid.
QWEN3_PATCH_DIM = 3 * 2 * 16 * 16
TIMESTAMP = 8
QWEN3_TEXT = dict(
    vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}, rope_theta=1e4,
)  # fmt: skip
QWEN3_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, num_position_embeddings=16,
)  # fmt: skip
DEEPSTACK = dict(deepstack_visual_indexes=[0, 1])
MOE_TEXT = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
# Qwen3.5 / Qwen4-Exp text: a gated-delta-net (linear attention) layer, then a full-attention one whose rotary covers
# half of each head, so its 3 M-RoPE sections hold 2 frequencies.
HYBRID_TEXT = dict(
    layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, partial_rotary_factor=0.5,
    rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 0], "mrope_interleaved": True},
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Qwen3Family:
    """How to build one family's whole model small: transformers' config and model classes, what the family adds
    to (or replaces in) the shared text and vision configs, and where its vision tower sits."""

    config: str
    model: str
    text: dict = dataclasses.field(default_factory=dict)
    vision: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)  # further entries of the top-level config
    visual: str = "model.visual"  # the vision tower's submodule path
    frame_groups: bool = True  # a video's frames are separate groups in the prompt
    since: str = "4.57"  # the first transformers version whose model runs these inputs


QWEN3_FAMILIES = {
    "qwen3_vl": Qwen3Family("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", vision=DEEPSTACK),
    "qwen3_vl_moe": Qwen3Family(
        "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", text=MOE_TEXT, vision=DEEPSTACK,
    ),  # fmt: skip
    "qwen3_5": Qwen3Family("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", text=HYBRID_TEXT),
    "qwen3_5_moe": Qwen3Family(
        "Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
        text={**HYBRID_TEXT, **MOE_TEXT, "shared_expert_intermediate_size": 16},
    ),  # fmt: skip
    # The thinker: the vision encoder and the MoE LLM that takes pixel_values (the talker and code2wav only take
    # the thinker's outputs). Its audio encoder must be built too; the inputs hold no audio. transformers 4.57.6's
    # thinker fails unpatched on a prompt holding images and a video: it joins their deepstack features through
    # the [batch, seq, hidden] placeholder masks ("shape mismatch: value tensor of shape [30, 32] cannot be
    # broadcast to indexing result of shape [960, 32]").
    "qwen3_omni_moe": Qwen3Family(
        "Qwen3OmniMoeThinkerConfig", "Qwen3OmniMoeThinkerForConditionalGeneration", text=MOE_TEXT, vision=DEEPSTACK,
        extra=dict(audio_config=dict(
            num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16, d_model=16,
            output_dim=32, downsample_hidden_size=8,
        )),
        visual="visual", frame_groups=False, since="5.0",
    ),  # fmt: skip
    # Hyper-connections over 2 residual streams; Qwen4-Exp's full attention is the QSA-indexed kind, which needs its
    # indexer sized (here a 4-token budget of 2-token blocks).
    "qwen4_exp": Qwen3Family(
        "Qwen4ExpConfig", "Qwen4ExpForConditionalGeneration",
        text={
            **HYBRID_TEXT, **MOE_TEXT, "shared_expert_intermediate_size": 16, "hc_count": 2, "hc_lowrank": 8,
            "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
            "indexer_compress_ratio": 2,
        },
    ),  # fmt: skip
}


def _qwen3_family(family: str) -> Qwen3Family:
    spec = QWEN3_FAMILIES[family]
    if not hasattr(transformers, spec.model):
        pytest.skip(f"transformers {transformers.__version__} has no {spec.model}")
    if Version(transformers.__version__) < Version(spec.since):
        pytest.skip(f"transformers {transformers.__version__}'s {spec.model} needs {spec.since} for these inputs")
    return spec


def _qwen3_model(family: str) -> nn.Module:
    spec = _qwen3_family(family)
    config = getattr(transformers, spec.config)(
        text_config={**QWEN3_TEXT, **spec.text}, vision_config={**QWEN3_VISION, **spec.vision}, image_token_id=IMAGE,
        video_token_id=VIDEO, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, **spec.extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, spec.model)(config).float().eval()
    with torch.no_grad():
        # HF's init (std 0.02) leaves the vision features nearly invisible in the logits. The gated delta nets
        # keep it: at std 0.2 their chunked fp32 recurrence amplifies rounding, HF's own included (Qwen3.5's fp32
        # vision gradients then lay 6e-5 of their largest element off float64's), past 1e-4 in the logits.
        for name, param in model.named_parameters():
            if (param.dim() > 1 and "linear_attn" not in name) or "visual" in name:
                param.normal_(0.0, 0.2)
    return model


def _qwen3_inputs(family: str) -> dict:
    spec = _qwen3_family(family)
    torch.manual_seed(1)
    ids, types = [5, 6], [0, 0]
    for grid, token, kind in [(g, IMAGE, 1) for g in IMAGE_GRIDS] + [(g, VIDEO, 2) for g in VIDEO_GRIDS]:
        count = grid[1] * grid[2] // 4
        groups, per_group = (grid[0], count) if spec.frame_groups else (1, grid[0] * count)
        for _ in range(groups):
            opening = [TIMESTAMP, VISION_START] if spec.frame_groups else [VISION_START]
            ids += opening + [token] * per_group + [VISION_END, 7]
            types += [0] * len(opening) + [kind] * per_group + [0, 0]
    images, videos = torch.tensor(IMAGE_GRIDS), torch.tensor(VIDEO_GRIDS)
    inputs = dict(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values=torch.randn(int(images.prod(-1).sum()), QWEN3_PATCH_DIM),
        image_grid_thw=images,
        pixel_values_videos=torch.randn(int(videos.prod(-1).sum()), QWEN3_PATCH_DIM),
        video_grid_thw=videos,
    )
    if spec.frame_groups:
        inputs["mm_token_type_ids"] = torch.tensor([types])
    else:
        inputs["video_second_per_grid"] = torch.tensor([1.0])
    return inputs


def _qwen3_vision_out(family: str, model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    """The merged tokens and the deepstack features (where the family has them) of the images and of the video."""
    visual = model.get_submodule(QWEN3_FAMILIES[family].visual)
    outs = []
    for pixels, grid in ((inputs["pixel_values"], inputs["image_grid_thw"]),
                         (inputs["pixel_values_videos"], inputs["video_grid_thw"])):  # fmt: skip
        out = visual(pixels, grid_thw=grid)
        # transformers 4.57's towers return a tuple
        if isinstance(out, tuple):
            merged, deepstack = out
        else:
            merged, deepstack = out.pooler_output, getattr(out, "deepstack_features", None) or []
        outs += [merged, *deepstack]
    return outs


@pytest.mark.parametrize("family", QWEN3_FAMILIES)
@pytest.mark.parametrize("backend", ["vlfuse", "eager"])
@pytest.mark.parametrize("tower", [True, False], ids=["tower", "pieces"])
def test_auto_qwen3_logits_match_and_revert(family, tower, backend):
    model, inputs = _qwen3_model(family), _qwen3_inputs(family)
    visual = model.get_submodule(QWEN3_FAMILIES[family].visual)
    with torch.no_grad():
        ref_logits = model(**inputs).logits
        ref_vision = _qwen3_vision_out(family, model, inputs)
    assert len(ref_vision) == (6 if "deepstack_visual_indexes" in QWEN3_FAMILIES[family].vision else 2)
    before = _state(model)
    vlfuse.patch.auto(model, tower=tower, backend=backend)
    _assert_state_unchanged(model, before)
    assert any("forward" in m.__dict__ or "_vlfuse_tower" in m.__dict__ for m in visual.modules())
    with torch.no_grad():
        logits = model(**inputs).logits
        vision = _qwen3_vision_out(family, model, inputs)
    if tower:
        engine = visual.__dict__["_vlfuse_tower"]  # the same Parameter objects (registered in another order in Omni)
        assert sorted(map(id, engine.parameters())) == sorted(map(id, visual.parameters()))
    for got, expected in zip(vision, ref_vision, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-4)
    _assert_state_unchanged(model, before)
    vlfuse.patch.revert(model)
    assert not any("forward" in m.__dict__ or "_vlfuse_tower" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


@pytest.mark.parametrize("family", QWEN3_FAMILIES)
def test_auto_qwen3_training_step_gradients_match(family):
    inputs = _qwen3_inputs(family)
    spec = QWEN3_FAMILIES[family]
    grads = []
    for patch in (False, True):
        model = _qwen3_model(family).train()
        if patch:
            vlfuse.patch.auto(model, tower=True)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    ref, got = grads
    assert list(got) == list(ref)
    # every vision parameter (position table and deepstack mergers included) takes part in the step
    assert {n for n, _ in model.named_parameters() if n.startswith(spec.visual + ".")} <= set(ref)
    for name in ref:
        # fp32 sums in another order: near-zero elements judged at the gradient's largest. The LLM's gradients see
        # that rounding of the vision features through the LLM, amplified in the gated delta nets' gate projections.
        atol = ref[name].abs().max().item() * (1e-5 if name.startswith(spec.visual + ".") else 1e-4)
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")

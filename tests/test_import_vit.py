"""import_vit: a timm ViT (random weights, built locally) loaded into the RoPE-2D vision tower."""

import json

import pytest
import torch

from vlfuse import ops, reference
from vlfuse.models.qwen2_vl.import_vit import import_vit
from vlfuse.models.qwen2_vl.vision import frame_cu_seqlens

timm = pytest.importorskip("timm")

E, HEADS, DEPTH = 64, 4, 2


def timm_vit(act_layer=None):
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {} if act_layer is None else {"act_layer": act_layer}
    vit = VisionTransformer(img_size=56, patch_size=14, embed_dim=E, depth=DEPTH, num_heads=HEADS, num_classes=5, **kwargs)
    with torch.no_grad():  # random everything, norms and biases included, so a dropped or swapped tensor shows
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == E else 0.0))
    return vit.eval()


def open_clip_names(state: dict) -> dict:
    """timm -> open_clip key names (``visual.`` prefix, fused in_proj, c_fc / c_proj), as open_clip saves them."""
    table = {
        "norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
        "attn.proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    }
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            for a, b in table.items():
                rest = rest.replace(a, b)
            out[f"visual.transformer.resblocks.{n}.{rest}"] = value
        elif key == "patch_embed.proj.weight":
            out["visual.conv1.weight"] = value
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key == "cls_token":
            out["visual.class_embedding"] = value.flatten()
        else:
            out[f"visual.{key}"] = value
    return out


def image(h=56, w=84):
    return torch.rand(1, 3, h, w)


def merge_order(grid_thw):
    return reference.raster_merge_index(grid_thw, 2)


def test_patch_embedding_equals_timm():
    vit = timm_vit()
    vit.patch_embed.img_size = None  # let timm take any multiple of the patch size
    vit.patch_embed.strict_img_size = False
    tower, report = import_vit(vit.state_dict(), {"num_heads": HEADS})
    x = image()
    # identity normalisation: timm sees the same pixels as the tower
    patches, grid = ops.patchify(x, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ours = tower.patch_embed(patches)
    theirs = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)[0]  # [h * w, E] in raster order
    torch.testing.assert_close(ours, theirs[merge_order(grid)], rtol=1e-5, atol=1e-5)
    assert "patch_embed.proj.weight" in report.loaded and "patch_embed.proj.bias" in report.loaded


def test_video_kernel_is_split_over_frames():
    vit = timm_vit()
    tower, _ = import_vit(vit.state_dict(), {"num_heads": HEADS})
    w3 = tower.patch_embed.proj.weight
    assert w3.shape == (E, 3, 2, 14, 14)
    torch.testing.assert_close(w3[:, :, 0] + w3[:, :, 1], vit.patch_embed.proj.weight)
    torch.testing.assert_close(w3[:, :, 0], w3[:, :, 1])


@pytest.mark.parametrize("source", ["timm", "open_clip"])
def test_blocks_equal_timm_with_identity_rotation(source):
    vit = timm_vit()
    state = vit.state_dict() if source == "timm" else open_clip_names(vit.state_dict())
    tower, _ = import_vit(state, {"num_heads": HEADS})
    h, w = 4, 6
    grid = torch.tensor([[1, h, w]])
    tokens = torch.randn(1, h * w, E)  # raster order, no position embedding added
    with torch.no_grad():
        theirs = vit.blocks(tokens)[0]
        order = merge_order(grid)
        x = tokens[0][order]
        positions = ops.vision_positions(grid, 2)
        zero_freqs = torch.zeros(2, E // HEADS // 2)  # identity rotation
        for block in tower.blocks:
            x = block(x, positions, zero_freqs, frame_cu_seqlens(grid))
    torch.testing.assert_close(x, theirs[order], rtol=1e-4, atol=1e-4)


def test_report_lists_loaded_reinitialized_and_unused():
    vit = timm_vit()
    tower, report = import_vit(vit.state_dict(), {"num_heads": HEADS, "hidden_size": 32})
    assert len(report.loaded) == 2 + 12 * DEPTH
    assert set(report.reinitialized) == {k for k in tower.state_dict() if k.startswith("merger.")}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"} == set(report.unused)
    assert "blocks.1.attn.qkv.weight" in report.loaded
    assert tower.merger.mlp[2].out_features == 32
    assert "unused" in report.summary()


def test_activation_follows_the_source():
    tower, _ = import_vit(timm_vit().state_dict(), {"num_heads": HEADS})
    assert tower.config.hidden_act == "gelu"
    from timm.layers import QuickGELU

    vit = timm_vit(act_layer=QuickGELU)
    tower, _ = import_vit(vit.state_dict(), {"num_heads": HEADS, "hidden_act": "quick_gelu"})
    x = torch.randn(5, E)
    torch.testing.assert_close(tower.blocks[0].mlp(x), vit.blocks[0].mlp(x))


def test_shape_mismatch_names_the_key():
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.weight"):
        import_vit(timm_vit().state_dict(), {"num_heads": HEADS, "mlp_ratio": 2.0})
    with pytest.raises(ValueError, match="no patch embedding"):
        import_vit({"foo.weight": torch.zeros(2)}, None)


def test_cli_import_vit(tmp_path):
    from safetensors.torch import load_file, save_file

    from vlfuse.__main__ import main

    vit = timm_vit()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    (tmp_path / "vision.json").write_text(json.dumps({"num_heads": HEADS, "hidden_size": 48}))
    assert main(["import-vit", "--from", str(tmp_path / "vit.safetensors"), "--to", str(tmp_path / "out"),
                 "--config", str(tmp_path / "vision.json")]) == 0
    saved = load_file(str(tmp_path / "out" / "vision_tower.safetensors"))
    assert torch.equal(saved["visual.blocks.0.attn.qkv.weight"], vit.blocks[0].attn.qkv.weight)
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    assert "pos_embed" in report["unused"]
    config = json.loads((tmp_path / "out" / "vision_config.json").read_text())
    assert config["depth"] == DEPTH and config["hidden_size"] == 48 and config["hidden_act"] == "gelu"

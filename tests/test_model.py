"""Qwen2-VL model package: config, positions, attention module, checkpoints, tokenizers, processor, generation
options, bad inputs and the CLI. (HF logits/generation parity lives in test_model_parity.py.)"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _qwen2_vl_helpers import IMAGE_PAD, VIDEO_PAD, patches, prompt, tiny_config

from vlfuse.models.qwen2_vl import (
    CharTokenizer,
    CheckpointError,
    HFTokenizer,
    Qwen2VL,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    load_tokenizer,
    mrope_freqs,
    rope_index,
)
from vlfuse.nn import RotaryAttention2D
from vlfuse.ops import CLIP_MEAN, CLIP_STD

BACKENDS = ["vlfuse", "eager"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny vlfuse model and its save_pretrained folder."""
    torch.manual_seed(0)
    model = Qwen2VL(tiny_config()).eval()
    folder = tmp_path_factory.mktemp("qwen2_vl")
    model.save_pretrained(folder)
    return model, folder


# ---- config ---------------------------------------------------------------------------------------------------


def test_presets_have_the_published_shapes():
    for name, width in (("2b", 1536), ("7b", 3584)):
        c = Qwen2VLConfig.preset(name)
        v = c.vision
        assert (v.depth, v.embed_dim, v.num_heads, v.mlp_ratio, v.patch_size, v.temporal_patch_size) == (
            32, 1280, 16, 4, 14, 2
        )
        assert v.spatial_merge_size == 2 and v.hidden_act == "quick_gelu"
        assert c.hidden_size == width == v.hidden_size and c.mrope_section == [16, 24, 24]
    assert Qwen2VLConfig.preset("2b").tie_word_embeddings and not Qwen2VLConfig.preset("7b").tie_word_embeddings
    tiny = Qwen2VLConfig.preset("tiny")
    assert tiny.vocab_size >= CharTokenizer().vocab_size
    with pytest.raises(ValueError, match="unknown Qwen2-VL preset"):
        Qwen2VLConfig.preset("70b")


def test_config_reads_both_hf_layouts_and_round_trips():
    flat_4x = {  # a published (4.x) config.json, trimmed
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12, "num_hidden_layers": 28,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 151936,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                          "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    }
    c = Qwen2VLConfig.from_hf_dict(flat_4x)
    assert c.replace(dtype=None) == Qwen2VLConfig.preset("2b")
    assert c.dtype == "bfloat16"
    again = Qwen2VLConfig.from_hf_dict(c.to_hf_dict())
    assert again == c
    assert "text_config" in c.to_hf_dict()


def test_initializer_range_sets_the_init_and_round_trips(tmp_path):
    config = tiny_config().replace(initializer_range=0.1)
    torch.manual_seed(0)
    model = Qwen2VL(config)
    for weight in (model.language_model.embed_tokens.weight, model.visual.blocks[0].mlp.fc1.weight):
        assert abs(float(weight.detach().std()) - 0.1) < 0.01
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["text_config"]["initializer_range"] == 0.1
    assert Qwen2VLConfig.from_pretrained(tmp_path).initializer_range == 0.1
    assert Qwen2VLConfig.preset("2b").initializer_range == 0.02  # HF's default for the published shapes


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2VLConfig.preset("tiny").replace(mrope_section=[4, 4, 4])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen2VLConfig.preset("tiny").replace(num_key_value_heads=3)


# ---- positions ------------------------------------------------------------------------------------------------


def test_mrope_freqs_give_hf_cos_sin():
    """The [3, D/2] frequency matrix reproduces HF's Qwen2VLRotaryEmbedding (cos/sin after mrope_section)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    config = tiny_config()
    hf_text = transformers.Qwen2VLConfig(**config.to_hf_dict()).text_config
    rotary = Qwen2VLRotaryEmbedding(hf_text)
    positions = torch.randint(0, 50, (3, 1, 9))
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    freqs = mrope_freqs(config.head_dim, config.rope_theta, config.mrope_section)
    angle = (positions[:, 0].T.float().unsqueeze(-1) * freqs).sum(1)  # [9, D/2]
    torch.testing.assert_close(torch.cat([angle.cos()] * 2, -1), cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([angle.sin()] * 2, -1), sin[0], atol=1e-6, rtol=0)


def test_rope_index_matches_hf_get_rope_index():
    transformers = pytest.importorskip("transformers")
    config = tiny_config()
    hf = transformers.Qwen2VLModel(transformers.Qwen2VLConfig(**config.to_hf_dict()))
    ids = torch.cat(
        [prompt([3, ("image", [1, 4, 6]), 2, ("video", [2, 4, 4]), 4, ("image", [1, 2, 2]), 1])] * 2
    )
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded second row (its first 2 text tokens are padding)
    types = (ids == IMAGE_PAD).long() + 2 * (ids == VIDEO_PAD).long()
    images = torch.tensor([[1, 4, 6], [1, 2, 2]] * 2)
    videos = torch.tensor([[2, 4, 4]] * 2)
    expected, deltas = hf.get_rope_index(ids, types, images, videos, attention_mask=mask)
    got, next_position = rope_index(ids, IMAGE_PAD, VIDEO_PAD, images, videos, mask)
    valid = mask.bool()
    assert torch.equal(got[:, valid], expected[:, valid])
    assert torch.equal(next_position, deltas.view(-1) + mask.sum(1))


def test_rope_index_text_after_long_video_resumes_past_every_axis():
    """A video with more merged frames than rows/columns: the next text position is one past the largest
    position used (the published Qwen2-VL rule), so no text token shares a position with a video frame."""
    ids = prompt([2, ("video", [6, 2, 2]), 3])
    positions, next_position = rope_index(ids, IMAGE_PAD, VIDEO_PAD, None, torch.tensor([[6, 2, 2]]))
    video_max = int(positions[:, 0, 3:9].max())
    assert video_max == 3 + 5
    assert positions[:, 0, 9].tolist() == [video_max + 1] * 3  # <|vision_end|>
    assert int(next_position) == int(positions[:, 0, -1].max()) + 1


def test_rope_index_rejects_grids_that_do_not_fit_the_prompt():
    ids = prompt([2, ("image", [1, 4, 4]), 2])
    with pytest.raises(ValueError, match="needs 16 pad tokens"):
        rope_index(ids, IMAGE_PAD, VIDEO_PAD, torch.tensor([[1, 8, 8]]))
    with pytest.raises(ValueError, match="more image pad tokens"):
        rope_index(ids, IMAGE_PAD, VIDEO_PAD, None)
    with pytest.raises(ValueError, match="more image grids"):
        rope_index(ids, IMAGE_PAD, VIDEO_PAD, torch.tensor([[1, 4, 4], [1, 2, 2]]))


# ---- RotaryAttention2D ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grids", [[[1, 4, 6]], [[3, 2, 4]], [[1, 4, 6], [2, 2, 4], [1, 2, 2]]])
def test_rotary_attention_matches_hf_vision_attention(grids, backend, dtype):
    """Equal segments (one image, a video's frames) and unequal ones (the block-diagonal mask) vs HF's
    VisionAttention with the same weights and cu_seqlens."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding, VisionAttention

    from vlfuse import ops
    from vlfuse.models.qwen2_vl.vision import frame_cu_seqlens

    dim, heads = 64, 4
    vision_config = transformers.Qwen2VLConfig(**tiny_config().to_hf_dict()).vision_config
    vision_config.embed_dim, vision_config.num_heads = dim, heads
    vision_config._attn_implementation = "sdpa"
    hf = VisionAttention(vision_config).to(dtype)
    ours = RotaryAttention2D(dim, heads, backend=backend).to(dtype)
    assert set(ours.state_dict()) == set(hf.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    ours.load_state_dict(hf.state_dict())
    grid = torch.tensor(grids)
    x = torch.randn(int(grid.prod(-1).sum()), dim, dtype=dtype)
    positions = ops.vision_positions(grid)
    cu_seqlens = frame_cu_seqlens(grid)
    cos, sin = Qwen2VLVisionRotaryEmbedding(vision_config)(x, positions)
    with torch.no_grad():
        expected = hf(x, cu_seqlens=cu_seqlens, position_embeddings=(cos, sin))
        got = ours(x, positions, ops.vision_rope_freqs(dim // heads), cu_seqlens)
    # fp32: both are float32 SDPA on the same rotated values; bf16: HF rounds the rotated q/k the same way (float32
    # math, one rounding), but the SDPA call shapes differ (per-segment vs batched/masked), so allow 2 bf16 ulps at
    # the output's scale
    atol = 1e-5 if dtype == torch.float32 else 2 * 2.0**-8 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_rotary_attention_backward_and_zero_tokens():
    attn = RotaryAttention2D(32, 2)
    grid = torch.tensor([[1, 2, 4], [1, 4, 2]])
    from vlfuse import ops
    from vlfuse.models.qwen2_vl.vision import frame_cu_seqlens

    x = torch.randn(16, 32, requires_grad=True)
    out = attn(x, ops.vision_positions(grid), ops.vision_rope_freqs(16), frame_cu_seqlens(grid))
    out.square().sum().backward()
    assert x.grad is not None and attn.qkv.weight.grad is not None and torch.isfinite(x.grad).all()
    empty = torch.zeros(0, 32)
    no_tokens = attn(empty, torch.zeros(0, 2, dtype=torch.int64), ops.vision_rope_freqs(16),
                     torch.zeros(1, dtype=torch.int32))
    assert no_tokens.shape == (0, 32)


# ---- model: forward, backends, training hooks -----------------------------------------------------------------


def test_backends_agree_and_loss_has_gradients(saved):
    model, folder = saved
    eager = Qwen2VL.from_pretrained(folder, backend="eager")
    config = model.config
    pixels, grid = patches([[1, 4, 4]], config)
    ids = prompt([3, ("image", [1, 4, 4]), 5])
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, pixel_values=pixels, image_grid_thw=grid, labels=labels)
    torch.testing.assert_close(out.logits, eager(ids, pixel_values=pixels, image_grid_thw=grid).logits,
                               atol=1e-5, rtol=0)
    out.loss.backward()
    vision_grad = model.visual.blocks[0].attn.qkv.weight.grad
    assert vision_grad is not None and vision_grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_visual_returns_merged_tokens(saved):
    model, _ = saved
    pixels, grid = patches([[1, 4, 6], [2, 2, 2]], model.config)
    with torch.no_grad():
        assert model.visual(pixels, grid).shape == ((24 + 8) // 4, model.config.hidden_size)


def test_batched_left_padded_generation_equals_one_by_one(saved):
    model, _ = saved
    config = model.config
    p1, g1 = patches([[1, 4, 4]], config)
    p2, g2 = patches([[1, 2, 4]], config)
    a = prompt([3, ("image", [1, 4, 4]), 6])
    b = prompt([1, ("image", [1, 2, 4]), 2])
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batched = model.generate(ids, pixel_values=torch.cat([p1, p2]), image_grid_thw=torch.cat([g1, g2]),
                             attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    one = model.generate(a, pixel_values=p1, image_grid_thw=g1, max_new_tokens=6, eos_token_id=[])
    two = model.generate(b, pixel_values=p2, image_grid_thw=g2, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(batched[0], one[0])
    assert torch.equal(batched[1, pad:], two[0])


def test_generation_options(saved):
    model, _ = saved
    ids = prompt([10])
    greedy = model.generate(ids, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=True, top_p=1e-6, eos_token_id=[]), greedy)
    draws = [
        model.generate(ids, max_new_tokens=8, do_sample=True, temperature=5.0, eos_token_id=[],
                       generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    # a stop token ends the row; finished rows are padded until all rows stop
    first = int(greedy[0, ids.shape[1]])
    stopped = model.generate(ids, max_new_tokens=5, eos_token_id=first)
    assert stopped.shape == (1, ids.shape[1] + 1) and int(stopped[0, -1]) == first
    assert model.generate(ids, max_new_tokens=0).shape == ids.shape


def test_bad_inputs_give_clear_errors(saved):
    model, _ = saved
    config = model.config
    pixels, grid = patches([[1, 4, 4]], config)
    ids = prompt([3, ("image", [1, 4, 4]), 5])
    with pytest.raises(ValueError, match="describes 32 patches but pixel_values has 16"):
        model(ids, pixel_values=pixels, image_grid_thw=torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of the merge size"):
        model(ids, pixel_values=pixels[:12], image_grid_thw=torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"pixel_values must be \[patches, 1176\]"):
        model(ids, pixel_values=pixels[:, :100], image_grid_thw=grid)
    with pytest.raises(ValueError, match="image pad tokens but no image pixel values"):
        model(ids)
    with pytest.raises(ValueError, match="has 4 image pad tokens but the images give 1"):
        p, g = patches([[1, 2, 2]], config)
        model(ids, pixel_values=p, image_grid_thw=g)
    long_ids = torch.zeros(1, config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(long_ids)
    with pytest.raises(ValueError, match="leaving no room to generate"):
        model.generate(long_ids[:, :-1])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, pixel_values=pixels, image_grid_thw=grid,
                       attention_mask=torch.cat([torch.ones(1, ids.shape[1] - 1), torch.zeros(1, 1)], 1).long())


# ---- checkpoints ----------------------------------------------------------------------------------------------


def _rewrite(folder, out, rename=None, drop=None, change=None):
    """Copies folder's checkpoint to out with keys renamed/dropped/changed (tensors loaded through safetensors)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out, exist_ok=True)
    state = load_file(os.path.join(folder, "model.safetensors"))
    state = {(rename(k) if rename else k): v for k, v in state.items() if not (drop and drop(k))}
    if change:
        state.update(change(state))
    save_file(state, os.path.join(out, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as src, open(os.path.join(out, "config.json"), "w") as dst:
        dst.write(src.read())


def test_reads_both_key_layouts_and_shards(saved, tmp_path):
    model, folder = saved
    ids = prompt([12])
    expected = model(ids).logits

    def to_5x(k):
        return "model.language_model." + k[6:] if k.startswith("model.") else (
            "model." + k if k.startswith("visual.") else k)

    _rewrite(folder, tmp_path / "v5", rename=to_5x)
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=150_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for sub in ("v5", "sharded"):
        loaded = Qwen2VL.from_pretrained(tmp_path / sub)
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)


def test_dtype_argument_and_recorded_dtype(saved, tmp_path):
    model, folder = saved
    assert Qwen2VL.from_pretrained(folder).dtype == torch.float32
    bf16 = Qwen2VL.from_pretrained(folder, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and bf16.visual.dtype == torch.bfloat16
    bf16.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    assert Qwen2VL.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_bad_checkpoints_are_rejected_naming_the_tensor(saved, tmp_path):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Qwen2VL.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen2VL.from_pretrained(tmp_path / "empty")
    _rewrite(folder, tmp_path / "noweights")
    os.remove(tmp_path / "noweights" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen2VL.from_pretrained(tmp_path / "noweights")

    # truncated: cut the file inside the data section; the error names the first tensor that is cut
    _rewrite(folder, tmp_path / "cut")
    path = tmp_path / "cut" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '[\w.]+'"):
        Qwen2VL.from_pretrained(tmp_path / "cut")

    _rewrite(folder, tmp_path / "shape", change=lambda s: {"model.norm.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[3\]"):
        Qwen2VL.from_pretrained(tmp_path / "shape")
    _rewrite(folder, tmp_path / "missing", drop=lambda k: k == "visual.blocks.1.mlp.fc2.bias")
    with pytest.raises(CheckpointError, match="first 'visual.blocks.1.mlp.fc2.bias'"):
        Qwen2VL.from_pretrained(tmp_path / "missing")
    _rewrite(folder, tmp_path / "extra", change=lambda s: {"visual.blocks.9.attn.qkv.weight": torch.ones(1)})
    with pytest.raises(CheckpointError, match="'visual.blocks.9.attn.qkv.weight' does not belong"):
        Qwen2VL.from_pretrained(tmp_path / "extra")


# ---- tokenizers and processor ---------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_and_keeps_specials_whole():
    tok = CharTokenizer()
    text = "héllo <|vision_start|><|image_pad|><|vision_end|>wörld<|im_end|>"
    ids = tok.encode(text)
    assert ids.count(262) == 1 and 259 in ids and 260 in ids and 258 in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "héllo wörld"


def test_hf_tokenizer_json_is_used_when_present(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|image_pad|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path, tiny_config())
    assert isinstance(loaded, HFTokenizer)
    assert loaded.encode("hello <|image_pad|> world") == [1, 3, 2]
    assert isinstance(load_tokenizer(tmp_path / "none", tiny_config()), CharTokenizer)


def test_processor_224_image_gives_66_llm_tokens():
    PIL = pytest.importorskip("PIL.Image")
    config = Qwen2VLConfig.preset("tiny")
    processor = Qwen2VLProcessor(CharTokenizer(), config)
    image = PIL.fromarray(torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8).numpy())
    inputs = processor("<|vision_start|><|image_pad|><|vision_end|>", images=[image])
    assert inputs["input_ids"].shape == (1, 66)
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert inputs["pixel_values"].shape == (256, 3 * 2 * 14 * 14)


def test_processor_batch_video_and_model_run_end_to_end():
    config = tiny_config()
    processor = Qwen2VLProcessor(CharTokenizer(), config, max_pixels=56 * 56)
    torch.manual_seed(0)
    model = Qwen2VL(config).eval()
    image = torch.randint(0, 256, (3, 100, 60), dtype=torch.uint8)
    video = torch.rand(5, 3, 56, 56)  # float frames in [0, 1], odd count
    texts = [processor.chat_prompt("what moves?", num_videos=1), processor.chat_prompt("colour?", num_images=1)]
    inputs = processor(texts, images=[image], videos=[video])
    assert inputs["video_grid_thw"].tolist() == [[3, 4, 4]]
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape
    assert int((inputs["input_ids"] == IMAGE_PAD).sum()) == processor.visual_tokens(inputs["image_grid_thw"][0])
    out = model.generate(**inputs, max_new_tokens=3)
    assert out.shape[0] == 2 and out.shape[1] <= inputs["input_ids"].shape[1] + 3
    assert isinstance(processor.decode(out[0]), str)


def test_processor_normalisation_round_trips_through_preprocessor_config(tmp_path):
    config = tiny_config()
    image = torch.randint(0, 256, (3, 56, 56), dtype=torch.uint8)
    mean, std = [0.9, 0.8, 0.7], [0.2, 0.25, 0.3]
    processor = Qwen2VLProcessor(CharTokenizer(), config, max_pixels=56 * 56, image_mean=mean, image_std=std)
    patches, _ = processor.process_image(image)
    clip, _ = Qwen2VLProcessor(CharTokenizer(), config, max_pixels=56 * 56).process_image(image)
    # The same pixels under the two normalisations: undo CLIP's, apply the custom one.
    view = (-1, 3, 2, 14, 14)
    pixels = clip.view(view) * torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1)
    expected = (pixels - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(patches.view(view), expected, rtol=1e-5, atol=1e-5)

    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_mean"] == mean and saved["image_std"] == std and saved["max_pixels"] == 56 * 56
    loaded = Qwen2VLProcessor.from_pretrained(tmp_path)
    assert loaded.image_mean == tuple(mean) and loaded.image_std == tuple(std) and loaded.max_pixels == 56 * 56
    torch.testing.assert_close(loaded.process_image(image)[0], patches, rtol=0, atol=0)
    # A folder without preprocessor_config.json keeps HF's CLIP defaults.
    config.save_pretrained(tmp_path / "bare")
    assert Qwen2VLProcessor.from_pretrained(tmp_path / "bare").image_mean == tuple(CLIP_MEAN)


def test_processor_errors():
    processor = Qwen2VLProcessor(CharTokenizer(), tiny_config())
    with pytest.raises(ValueError, match="too small: 20x100"):
        processor.process_image(torch.zeros(3, 20, 100, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 <|image_pad|> placeholders but 2 image"):
        img = torch.zeros(3, 56, 56, dtype=torch.uint8)
        processor("<|image_pad|>", images=[img, img])
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        processor.process_video(torch.zeros(3, 56, 56))
    with pytest.raises(ValueError, match="image_mean must hold one value per RGB channel"):
        Qwen2VLProcessor(CharTokenizer(), tiny_config(), image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="image_std must be positive"):
        Qwen2VLProcessor(CharTokenizer(), tiny_config(), image_std=[0.2, 0.0, 0.2])


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_generate(saved, tmp_path, capsys):
    PIL = pytest.importorskip("PIL.Image")
    from vlfuse.__main__ import main

    _, folder = saved
    image = tmp_path / "img.png"
    PIL.fromarray(torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8).numpy()).save(image)
    rc = main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "what?",
               "--max-new-tokens", "4"])
    assert rc == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--image", str(tmp_path / "no.png"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nomodel"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Qwen2VL(tiny_config())
    pixels, grid = patches([[1, 4, 4]], model.config)
    ids = prompt([3, ("image", [1, 4, 4]), 5])

    def grads():
        model.zero_grad(set_to_none=True)
        model(ids, pixel_values=pixels, image_grid_thw=grid, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(saved, backend):
    model, folder = saved
    gpu = Qwen2VL.from_pretrained(folder, backend=backend).cuda()
    pixels, grid = patches([[1, 4, 6], [2, 2, 2]], model.config)
    ids = prompt([3, ("image", [1, 4, 6]), 2, ("image", [2, 2, 2]), 4])
    expected = model(ids, pixel_values=pixels, image_grid_thw=grid).logits
    got = gpu(ids.cuda(), pixel_values=pixels.cuda(), image_grid_thw=grid.cuda()).logits
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    a = model.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=8, eos_token_id=[])
    b = gpu.generate(ids.cuda(), pixel_values=pixels.cuda(), image_grid_thw=grid.cuda(), max_new_tokens=8,
                     eos_token_id=[])
    assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_training_step(saved, backend):
    """Training runs in bf16 autocast over float32 weights: forward, backward, every parameter gets a finite
    gradient, and the loss stays within bf16 rounding of the float32 loss (8 mantissa bits over a few layers:
    a relative 2%)."""
    _, folder = saved
    model = Qwen2VL.from_pretrained(folder, backend=backend).train()
    pixels, grid = patches([[1, 4, 6], [2, 2, 2]], model.config)
    ids = prompt([3, ("image", [1, 4, 6]), 2, ("image", [2, 2, 2]), 4])
    with torch.no_grad():
        fp32_loss = model(ids, pixel_values=pixels, image_grid_thw=grid, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, pixel_values=pixels, image_grid_thw=grid, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.float(), fp32_loss, rtol=2e-2, atol=0)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name

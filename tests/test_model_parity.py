"""Qwen2-VL parity with HF transformers (the reference nobody here wrote): a small random
``Qwen2VLForConditionalGeneration`` saved with ``save_pretrained`` and loaded by vlfuse, both backends."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _qwen2_vl_helpers import (  # noqa: E402
    hf_model,
    mm_token_type_ids,
    patches,
    prompt,
    tiny_config,
)

from vlfuse.models.qwen2_vl import Qwen2VL, Qwen2VLProcessor  # noqa: E402
from vlfuse.models.qwen2_vl.tokenizer import CharTokenizer  # noqa: E402

BACKENDS = ["vlfuse", "eager"]
FP32_LOGITS_ATOL = 1e-4  # the bound; logits are O(1-10) here


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(HF model, its save_pretrained folder, the config) shared by the module: building it is the slow part."""
    config = tiny_config(tie=False)
    model = hf_model(config)
    folder = tmp_path_factory.mktemp("hf_qwen2_vl")
    model.save_pretrained(folder)
    return model, folder, config


@pytest.fixture(scope="module")
def models(hf_pair):
    _, folder, _ = hf_pair
    return {backend: Qwen2VL.from_pretrained(folder, backend=backend) for backend in BACKENDS}


def _video_inputs(config):
    """A 3-frame video (odd: the processor repeats the last frame) through vlfuse's processor."""
    processor = Qwen2VLProcessor(CharTokenizer(), config, min_pixels=28 * 28, max_pixels=56 * 84)
    frames = torch.randint(0, 256, (3, 3, 56, 84), dtype=torch.uint8)
    pixels, grid = processor.process_video(frames)
    assert grid.tolist() == [[2, 4, 6]]
    ids = prompt([4, ("video", grid[0].tolist()), 6])
    return dict(input_ids=ids, pixel_values_videos=pixels, video_grid_thw=grid)


def _case(name: str, config):
    if name == "image":
        pixels, grid = patches([[1, 4, 6]], config)
        return dict(input_ids=prompt([5, ("image", [1, 4, 6]), 7]), pixel_values=pixels, image_grid_thw=grid)
    if name == "two_images":
        pixels, grid = patches([[1, 6, 4], [1, 2, 2]], config)
        ids = prompt([3, ("image", [1, 6, 4]), 2, ("image", [1, 2, 2]), 5])
        return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid)
    if name == "video":
        return _video_inputs(config)
    if name == "text":
        return dict(input_ids=prompt([12]))
    raise KeyError(name)


def _hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"])).logits


@pytest.mark.parametrize("case", ["image", "video", "two_images", "text"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_hf_fp32(hf_pair, models, backend, case):
    hf, _, config = hf_pair
    inputs = _case(case, config)
    expected = _hf_logits(hf, inputs)
    with torch.no_grad():
        got = models[backend](**inputs).logits
    assert got.shape == expected.shape
    assert expected.abs().max() > 1.0  # the test would be weak on near-zero logits
    torch.testing.assert_close(got, expected, atol=FP32_LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_matches_hf(hf_pair, models, backend):
    hf, _, config = hf_pair
    inputs = _case("image", config)
    labels = inputs["input_ids"].clone()
    labels[:, :8] = -100
    with torch.no_grad():
        expected = hf(**inputs, labels=labels, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"])).loss
        got = models[backend](**inputs, labels=labels).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_hf_bf16(hf_pair, backend):
    """bf16 tolerance, justified: both implementations round every op's output to bf16 (8 bits of mantissa), in
    different places (the fused ops round once after float32 math where HF rounds cos/sin and products), so they
    cannot agree to more than bf16's own error. We measure that error as HF-bf16 vs HF-fp32 on the same inputs and
    require vlfuse-bf16 to be within 2x of it (plus one bf16 ulp at the logits' scale for near-equal cases)."""
    hf, folder, config = hf_pair
    inputs = _case("two_images", config)
    reference = _hf_logits(hf, inputs)
    hf_bf16 = hf_model(config).to(torch.bfloat16)  # same seed: the same weights as hf, in bf16
    hf_bf16.load_state_dict(hf.state_dict())
    hf_error = (_hf_logits(hf_bf16, inputs).float() - reference).abs().max().item()
    model = Qwen2VL.from_pretrained(folder, backend=backend, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        ours = model(**inputs).logits.float()
    our_error = (ours - reference).abs().max().item()
    ulp = reference.abs().max().item() * 2.0**-8
    assert our_error <= 2 * hf_error + ulp, (our_error, hf_error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_hf(hf_pair, models, backend):
    hf, _, config = hf_pair
    inputs = _case("image", config)
    hf.generation_config.eos_token_id = None  # run all 20 steps
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = hf.generate(
            **inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"]), max_new_tokens=20, do_sample=False
        )
    got = models[backend].generate(**inputs, max_new_tokens=20, eos_token_id=[])
    assert got.shape == (1, inputs["input_ids"].shape[1] + 20)
    assert torch.equal(got, expected)
    assert len(set(got[0, -20:].tolist())) > 1  # a degenerate model repeating one token would prove little


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generation_matches_hf_video(hf_pair, models, backend):
    """Continuation positions after a video (where the 3 axes differ) must equal HF's rope deltas."""
    hf, _, config = hf_pair
    inputs = _case("video", config)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        expected = hf.generate(
            **inputs, mm_token_type_ids=mm_token_type_ids(inputs["input_ids"]), max_new_tokens=8, do_sample=False
        )
    assert torch.equal(models[backend].generate(**inputs, max_new_tokens=8, eos_token_id=[]), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_tower_matches_hf(hf_pair, models, backend):
    """The tower alone vs HF's Qwen2VisionTransformerPretrainedModel: an image and a 2-frame video of different
    frame sizes in one call (segments of unequal length: the block-diagonal path), and one image (equal path)."""
    hf, _, config = hf_pair
    for grids in ([[1, 4, 6], [2, 2, 4]], [[1, 4, 4]], [[3, 2, 2]]):
        pixels, grid = patches(grids, config)
        with torch.no_grad():
            expected = hf.model.visual(pixels, grid_thw=grid).pooler_output
            got = models[backend].visual(pixels, grid)
        assert got.shape == (int(grid.prod(-1).sum()) // 4, config.hidden_size)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_vlfuse_checkpoint_loads_in_transformers(tmp_path, tie):
    """vlfuse's save_pretrained output (4.x key layout; sharded for the tied case) loads in transformers with
    no missing or unexpected keys and gives the same logits."""
    config = tiny_config(tie=tie)
    torch.manual_seed(1)
    model = Qwen2VL(config).eval()
    model.save_pretrained(tmp_path, max_shard_bytes=200_000 if tie else None)
    hf, info = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = _case("two_images", config)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, _hf_logits(hf.eval(), inputs), atol=1e-5, rtol=0)


def test_hf_checkpoint_with_tied_embeddings_loads(tmp_path):
    """transformers omits lm_head.weight when the head is tied (as Qwen2-VL-2B is); vlfuse ties it back."""
    config = tiny_config(tie=True)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    model = Qwen2VL.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.language_model.embed_tokens.weight
    inputs = _case("image", config)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, _hf_logits(hf, inputs), atol=FP32_LOGITS_ATOL, rtol=0)

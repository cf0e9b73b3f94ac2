"""The synthetic corpus, the JSONL format, the sample encoder (chat template, labels, visual pads) and the collate."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from vlfuse.train.data import IGNORE_INDEX, BatchStream, JsonlDataset, SampleEncoder, collate, read_jsonl
from vlfuse.train.synthetic import MOTION_FRAMES, OPPOSITE, CorpusSpec, make_corpus

SMALL = {
    "train": CorpusSpec(shape_colour=6, characters=6, motion=8, count=3, dialogue=3),
    "val": CorpusSpec(shape_colour=2, characters=2, motion=2),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, seed=3, splits=SMALL)
    return root


@pytest.fixture(scope="module")
def encoder():
    from vlfuse.models.qwen2_vl import Qwen2VLConfig, Qwen2VLProcessor
    from vlfuse.models.qwen2_vl.tokenizer import load_tokenizer

    config = Qwen2VLConfig.preset("tiny")
    processor = Qwen2VLProcessor(load_tokenizer(None, config), config, min_pixels=56 * 56, max_pixels=112 * 112)
    return SampleEncoder(processor)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_corpus_is_deterministic_and_offline(tmp_path, corpus):
    make_corpus(tmp_path / "again", seed=3, splits=SMALL)
    assert _digest(tmp_path / "again") == _digest(corpus)
    make_corpus(tmp_path / "other", seed=4, splits=SMALL)
    assert _digest(tmp_path / "other") != _digest(corpus)


def test_corpus_tasks_and_splits(corpus):
    train, val = read_jsonl(corpus / "train.jsonl"), read_jsonl(corpus / "val.jsonl")
    assert len(train) == 26 + 8 and len(val) == 6  # each training clip is also played backwards
    assert {s["task"] for s in train} == {"shape_colour", "characters", "motion", "count", "dialogue"}
    frames = {len(s["videos"][0]) for s in train if s["task"] == "motion"}
    assert any(n % 2 for n in frames) and any(n % 2 == 0 for n in frames), frames
    assert {len(s["videos"][0]) for s in val if s["task"] == "motion"} <= set(MOTION_FRAMES["held_out"])
    assert all(len(s["images"]) == 2 for s in train if s["task"] == "count")
    assert all(sum(t["role"] == "assistant" for t in s["conversations"]) == 2 for s in train if s["task"] == "dialogue")
    assert all(Path(p).is_file() for s in train + val for p in s["images"] + sum(s["videos"], []))
    assert not {s["id"] for s in train} & {s["id"] for s in val}


def test_training_clips_are_also_played_backwards(corpus):
    train, val = read_jsonl(corpus / "train.jsonl"), read_jsonl(corpus / "val.jsonl")
    clips = {s["id"]: s for s in train if s["task"] == "motion"}
    forward = [s for s in clips.values() if not s["id"].endswith("r")]
    assert len(forward) == 8 and len(clips) == 16
    for s in forward:
        backward = clips[s["id"] + "r"]
        assert backward["videos"][0] == s["videos"][0][::-1]
        assert backward["conversations"][1]["content"] == OPPOSITE[s["conversations"][1]["content"]]
    assert not any(s["id"].endswith("r") for s in val)


def test_encoder_labels_only_answers(corpus, encoder):
    samples = read_jsonl(corpus / "train.jsonl")
    dialogue = next(s for s in samples if s["task"] == "dialogue")
    e = encoder(dialogue)
    assert len(e.input_ids) == len(e.labels)
    labelled = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    tok = encoder.tokenizer
    answers = [t["content"] for t in dialogue["conversations"] if t["role"] == "assistant"]
    assert labelled == sum(([*tok.encode(a), encoder.im_end] for a in answers), [])
    assert all(lab in (IGNORE_INDEX, tid) for tid, lab in zip(e.input_ids, e.labels))


def test_encoder_visual_pads_match_grids(corpus, encoder):
    samples = read_jsonl(corpus / "train.jsonl")
    for sample in samples:
        e = encoder(sample)
        if sample["images"]:
            assert e.image_grid_thw.shape[0] == len(sample["images"])
            assert e.input_ids.count(encoder.image_pad) == int(e.image_grid_thw.prod(-1).sum()) // 4
            assert e.pixel_values.shape[0] == int(e.image_grid_thw.prod(-1).sum())
        if sample["videos"]:
            frames = len(sample["videos"][0])
            assert e.video_grid_thw[0, 0].item() == (frames + 1) // 2  # an odd count repeats the last frame
            assert e.input_ids.count(encoder.video_pad) == int(e.video_grid_thw.prod(-1).sum()) // 4


def test_images_keep_their_size(corpus, encoder):
    grids = {tuple(encoder(s).image_grid_thw[0].tolist()) for s in read_jsonl(corpus / "train.jsonl") if s["images"]}
    assert len(grids) > 2  # dynamic resolution: several (h, w) grids in one corpus


def test_collate_packs_samples(corpus, encoder):
    ds = JsonlDataset(corpus / "train.jsonl", encoder)
    batch = [ds[i] for i in range(len(ds))]
    out = collate(batch, pad_id=0)
    B = len(batch)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    assert out["input_ids"].shape[0] == B
    assert out["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in batch]
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())
    assert out["pixel_values_videos"].shape[0] == int(out["video_grid_thw"].prod(-1).sum())
    assert int((out["input_ids"] == encoder.image_pad).sum()) == int(out["image_grid_thw"].prod(-1).sum()) // 4
    assert bool((out["labels"][out["attention_mask"] == 0] == IGNORE_INDEX).all())


def test_user_format_with_frame_folder_and_llava_roles(tmp_path, corpus, encoder):
    frames = sorted((corpus / "train").glob("*_f*.png"))[:3]
    (tmp_path / "clip").mkdir()
    for i, f in enumerate(frames):
        (tmp_path / "clip" / f"{i:03d}.png").write_bytes(f.read_bytes())
    line = {
        "videos": ["clip"],
        "conversations": [{"from": "human", "value": "<video>Which way?"}, {"from": "gpt", "value": "left"}],
    }
    (tmp_path / "mine.jsonl").write_text(json.dumps(line) + "\n")
    [sample] = read_jsonl(tmp_path / "mine.jsonl")
    e = encoder(sample)
    assert e.video_grid_thw.tolist() == [[2, 4, 4]]
    assert [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX][:-1] == encoder.tokenizer.encode("left")


def test_bad_jsonl_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_marker_count_mismatch_is_an_error(tmp_path, corpus, encoder):
    image = next((corpus / "train").glob("*.png"))
    line = {"images": [str(image), str(image)], "conversations": [{"role": "user", "content": "<image>?"}]}
    (tmp_path / "x.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="more images"):
        encoder(read_jsonl(tmp_path / "x.jsonl")[0])


def test_batch_stream_is_a_pure_function_of_position():
    a, b = BatchStream(10, seed=1), BatchStream(10, seed=1)
    first = a.indices(0, 25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))
    assert b.indices(7, 18) == first[7:25]
    assert BatchStream(10, seed=2).indices(0, 10) != first[:10]
    assert torch.tensor(first).max() < 10


def test_pixel_statistics_match_a_direct_computation(corpus):
    import numpy as np
    from PIL import Image

    from vlfuse.train.data import pixel_statistics

    samples = read_jsonl(corpus / "train.jsonl")
    mean, std = pixel_statistics(samples, limit=len(samples))
    paths = [p for s in samples for p in s["images"] + sum(s["videos"], [])]
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3) / 255.0 for p in paths])
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-5)
    with pytest.raises(ValueError, match="no images or video frames"):
        pixel_statistics([{"images": [], "videos": []}])


def test_each_shape_is_centred_in_one_merge_window():
    import random

    from vlfuse.train.synthetic import COLOURS, SHAPES, shape_image

    rng = random.Random(0)
    for i in range(200):
        image = shape_image(rng, SHAPES[i % len(SHAPES)], list(COLOURS)[i % len(COLOURS)])
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
        rows, cols = (pixels.min(-1).values < 200).nonzero(as_tuple=True)  # the background is >= 225 everywhere
        for lo, hi in ((int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max()))):
            window = 28 * ((lo + hi) // 2 // 28)  # it reaches at most 2 px (its jitter) into the next windows
            assert window - 2 <= lo and hi <= window + 29 and hi - lo >= 16, (i, image.size, lo, hi)

"""Training stages: real freezing, exact resume, atomic checkpoints, NaN stop, accumulation, schedule, outputs."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlfuse.train import checkpoint as ckpt
from vlfuse.train.optim import STAGE_TRAINABLE, part_of, warmup_cosine
from vlfuse.train.synthetic import CorpusSpec, make_corpus
from vlfuse.train.trainer import Trainer, TrainingDiverged

SMALL = {"train": CorpusSpec(shape_colour=6, characters=4, motion=4, count=2, dialogue=2)}

# A smaller-than-tiny model keeps every test to a second or two of CPU.
MODEL = {
    "preset": "tiny",
    "overrides": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "mrope_section": [2, 3, 3],
        "vision": {"embed_dim": 32, "num_heads": 2, "depth": 1, "hidden_size": 32},
    },
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, seed=0, splits=SMALL)
    return root / "train.jsonl"


def config(corpus, out, **changes):
    cfg = {
        "model": dict(MODEL),
        "data": {"train": str(corpus)},
        "optim": {"lr": {"vision": 1e-2, "merger": 1e-2, "llm": 1e-2}, "weight_decay": 0.1},
        "schedule": {"steps": 4, "warmup": 2},
        "batch": {"size": 4},
        "output": str(out),
        "progress": False,
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def latest_weights(out) -> dict:
    return weights(ckpt.latest_checkpoint(out))


def assert_same(a: dict, b: dict, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_freezing_is_real(corpus, tmp_path, stage):
    trainer = Trainer(config(corpus, tmp_path), stage=stage)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    for _ in range(2):
        record = trainer.train_step()
        # check gradients after backward (train_step clears them with set_to_none, so look at the optimizer state)
        assert math.isfinite(record["loss"])
    trainable = STAGE_TRAINABLE[stage]
    for name, p in trainer.model.named_parameters():
        part = part_of(name)
        if part in trainable:
            assert p.requires_grad and id(p) in in_optimizer, name
        else:
            assert not p.requires_grad, name
            assert p.grad is None, name
            assert id(p) not in in_optimizer and p not in trainer.optimizer.state, name
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    moved = {part_of(n) for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(trainable)


def test_frozen_parameters_get_no_gradient_in_backward(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path), stage=1)
    batch = trainer._micro_batches()[0]
    trainer._forward_loss_sum(batch).backward()
    for name, p in trainer.model.named_parameters():
        assert (p.grad is None) == (part_of(name) == "llm"), name


def test_resume_equals_uninterrupted(corpus, tmp_path):
    full = Trainer(config(corpus, tmp_path / "full", save_every=2, schedule={"steps": 4}), stage=2)
    full.train()

    first = Trainer(config(corpus, tmp_path / "split", save_every=2, schedule={"steps": 4}), stage=2)
    step = first.train_step

    def step_then_die():
        record = step()
        if first.step == 3:  # step 3 is lost: the run dies after it, before its metrics line and the next save
            raise KeyboardInterrupt
        return record

    first.train_step = step_then_die
    with pytest.raises(KeyboardInterrupt):
        first.train()
    second = Trainer(config(corpus, tmp_path / "split", save_every=2, schedule={"steps": 4}), stage=2)
    second.train(resume=True)
    assert second.step == 4
    assert_same(latest_weights(tmp_path / "split"), latest_weights(tmp_path / "full"))
    state = json.loads((ckpt.latest_checkpoint(tmp_path / "split") / "state.json").read_text())
    assert state["step"] == 4 and state["position"] == 4 * 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the lost step's line was replaced on resume


def test_kill_during_save_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    cfg = config(corpus, tmp_path / "run", save_every=2, schedule={"steps": 6})
    reference = Trainer(config(corpus, tmp_path / "ref", save_every=2, schedule={"steps": 6}), stage=2)
    reference.train()

    real_write = ckpt.write_files
    calls = []

    def dying_write(folder, model_state, *rest):
        calls.append(folder)
        if len(calls) == 2:  # the save at step 4: killed while the weights are half written
            (folder / "model.safetensors").write_bytes(b"\0" * 1000)
            raise SystemExit("killed")
        return real_write(folder, model_state, *rest)

    monkeypatch.setattr(ckpt, "write_files", dying_write)
    with pytest.raises(SystemExit):
        Trainer(cfg, stage=2).train()
    monkeypatch.setattr(ckpt, "write_files", real_write)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith(".tmp-step_0000004") and names[1] == "step_0000002"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_0000002"]

    resumed = Trainer(cfg, stage=2)
    assert resumed.resume() and resumed.step == 2
    resumed.train(resume=True)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert_same(latest_weights(tmp_path / "run"), latest_weights(tmp_path / "ref"))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(corpus, tmp_path):
    trainer = Trainer(config(corpus, tmp_path, save_every=2, schedule={"steps": 6}), stage=2)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output.logits.mul_(float("nan"))

    trainer.model.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*step_0000002"):
        trainer.train()
    assert trainer.step == 2
    saved = latest_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000002"]
    assert all(torch.equal(saved[n], p.detach()) for n, p in trainer.model.state_dict().items() if n in saved)


# For comparisons up to rounding: Adam's eps well above rounding noise, since parameters whose true gradient is
# exactly zero (the key bias: softmax ignores a shift shared by all keys) would turn noise into lr-sized steps.
ROUNDING = {"optim": {"eps": 1e-3}}


def test_gradient_accumulation_equals_one_big_batch(corpus, tmp_path):
    one = Trainer(config(corpus, tmp_path / "one", schedule={"steps": 2}, **ROUNDING), stage=2)
    one.train()
    micro = {"size": 4, "accumulation": 2}
    acc = Trainer(config(corpus, tmp_path / "acc", schedule={"steps": 2}, batch=micro, **ROUNDING), stage=2)
    acc.train()
    assert_same(latest_weights(tmp_path / "acc"), latest_weights(tmp_path / "one"), exact=False)


def test_gradient_checkpointing_and_bf16_run(corpus, tmp_path):
    plain = Trainer(config(corpus, tmp_path / "plain", schedule={"steps": 1}, **ROUNDING), stage=2)
    plain.train()
    changes = dict(schedule={"steps": 1}, gradient_checkpointing=True, **ROUNDING)
    recompute = Trainer(config(corpus, tmp_path / "gc", **changes), stage=2)
    recompute.train()
    assert_same(latest_weights(tmp_path / "gc"), latest_weights(tmp_path / "plain"), exact=False)
    bf16 = Trainer(config(corpus, tmp_path / "bf16", schedule={"steps": 1}, precision="bf16"), 2)
    assert math.isfinite(bf16.train_step()["loss"])


def test_per_part_learning_rates_and_schedule(corpus, tmp_path):
    lr = {"vision": 1e-3, "merger": 2e-3, "llm": 3e-3}
    trainer = Trainer(config(corpus, tmp_path, optim={"lr": lr}, schedule={"steps": 10, "warmup": 4}), stage=2)
    f = warmup_cosine(4, 10, 0.1)
    for step in range(10):
        record = trainer.train_step()
        for part, base in lr.items():
            assert record[f"lr_{part}"] == pytest.approx(base * f(step))
    assert f(3) == 1.0 and f(4) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 12))
    decay = {(g["part"], g["weight_decay"]) for g in trainer.optimizer.param_groups}
    assert ("llm", 0.0) in decay and ("llm", 0.1) in decay  # norms and biases are not decayed


def test_outputs_metrics_plot_and_final_model(corpus, tmp_path, capsys):
    from vlfuse.models.qwen2_vl import Qwen2VL

    trainer = Trainer(config(corpus, tmp_path, progress=True, log_every=2), stage=1)
    final = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "grad_norm", "tokens", "tokens_per_s", "lr_vision", "lr_merger"} <= records[0].keys()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    err = capsys.readouterr().err
    assert "stage 1" in err and "4/4" in err and "tok/s" in err and "ETA" in err
    model = Qwen2VL.from_pretrained(final)
    state = trainer.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_next_stage_starts_from_previous_final(corpus, tmp_path):
    first = Trainer(config(corpus, tmp_path / "s1", schedule={"steps": 1}), stage=1)
    final = first.train()
    second = Trainer(config(corpus, tmp_path / "s2", model={"init": str(final)}), stage=2)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_train_with_yaml_config(corpus, tmp_path):
    import yaml

    from vlfuse.__main__ import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(corpus, tmp_path / "out", schedule={"steps": 2})))
    assert main(["train", "--stage", "3", "--config", str(path)]) == 0
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    assert main(["train", "--stage", "3", "--config", str(path), "--resume"]) == 0  # already done: no new steps


def test_unknown_config_field_is_an_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="optim.learning_rate"):
        Trainer(config(corpus, tmp_path, optim={"learning_rate": 1.0}), stage=1)


def test_demo_runs_the_yaml_configs_in_its_own_folders(tmp_path):
    from vlfuse.train import config as config_mod
    from vlfuse.train.demo import STAGE_SEED_STRIDE, STAGES, config_dir, stage_config

    data, runs = tmp_path / "data", tmp_path / "runs"
    for stage in STAGES:
        yaml_config = config_mod.load(config_dir() / f"tiny_stage{stage}.yaml")
        demo = stage_config(stage, data, runs, seed=2)
        assert demo["seed"] == yaml_config["seed"] + 2 * STAGE_SEED_STRIDE
        assert demo["data"]["train"] == str(data / "train.jsonl") and demo["output"] == str(runs / f"stage{stage}")
        assert demo["model"]["init"] == (None if stage == 1 else str(runs / f"stage{stage - 1}" / "final"))
        for key in ("seed", "output"):
            demo[key] = yaml_config[key]
        demo["data"]["train"], demo["model"]["init"] = yaml_config["data"]["train"], yaml_config["model"]["init"]
        assert demo == yaml_config
    with pytest.raises(ValueError, match="stage must be one of"):
        stage_config(4, data, runs)


def test_demo_bench_table_is_the_quick_bench_called_as_a_library(monkeypatch):
    from vlfuse.bench import cli as bench_cli
    from vlfuse.train import demo

    calls = []
    monkeypatch.setattr(bench_cli, "run_bench", lambda **options: calls.append(options) or 0)
    code, seconds = demo.run_bench()
    assert code == 0 and seconds >= 0 and calls == [{"quick": True}]


def test_corpus_normalisation_is_measured_saved_and_inherited(corpus, tmp_path):
    from vlfuse.models.qwen2_vl import Qwen2VLProcessor
    from vlfuse.train.data import pixel_statistics, read_jsonl

    mean, std = pixel_statistics(read_jsonl(corpus))
    # The synthetic backgrounds are near white: the corpus is far from CLIP's mean, which is why the demo measures it.
    assert all(0.7 < m < 1.0 for m in mean) and all(0.05 < s < 0.4 for s in std), (mean, std)
    first = Trainer(config(corpus, tmp_path / "s1", data={"image_mean": "corpus", "image_std": "corpus"}), stage=1)
    assert first.processor.image_mean == tuple(mean) and first.processor.image_std == tuple(std)
    final = first.train()
    assert Qwen2VLProcessor.from_pretrained(final).image_mean == tuple(mean)
    second = Trainer(config(corpus, tmp_path / "s2", model={**MODEL, "init": str(final)}), stage=2)
    assert second.processor.image_std == tuple(std)
    explicit = Trainer(config(corpus, tmp_path / "s3", data={"image_mean": [0.5, 0.5, 0.5]}), stage=1)
    assert explicit.processor.image_mean == (0.5, 0.5, 0.5)


def test_demo_threads_use_the_cores_no_other_task_is_using(monkeypatch):
    from vlfuse.train import demo

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(demo, "_runnable_others", lambda: 0)
    assert demo.demo_threads() == cores
    monkeypatch.setattr(demo, "_runnable_others", lambda: cores + 3)
    assert demo.demo_threads() == 1
    monkeypatch.undo()
    assert demo._runnable_others() >= 0

"""Data-parallel training: 2 processes (gloo, CPU) take the same steps as one process on the same global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from vlfuse.train.synthetic import CorpusSpec, make_corpus

from test_train import ROUNDING, config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, strategy: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from vlfuse.train.trainer import Trainer

    cfg = {**cfg, "distributed": {"strategy": strategy}}
    try:
        Trainer(cfg, stage=2).train()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, seed=1, splits={"train": CorpusSpec(shape_colour=4, characters=4, motion=4, count=2, dialogue=2)})
    return root / "train.jsonl"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(corpus, tmp_path, strategy):
    from vlfuse.train.trainer import Trainer

    changes = {"schedule": {"steps": 3, "warmup": 1}, **ROUNDING}
    single = Trainer(config(corpus, tmp_path / "single", **changes), stage=2)
    single.train()
    cfg = config(corpus, tmp_path / "ddp", **changes)
    mp.start_processes(_worker, args=(2, _free_port(), cfg, strategy), nprocs=2, join=True, start_method="spawn")
    one = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    ckpts = sorted((tmp_path / "ddp" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_0000003"]
    assert len(torch.load(ckpts[0] / "rng.pt", weights_only=False)) == 2  # each rank's RNG state

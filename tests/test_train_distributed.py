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


def _grads_worker(rank: int, world: int, port: int, strategy: str, batches: list, out: str) -> None:
    """One rank's forward and backward of its own batch (rank 1's is text only); rank 0 saves the reduced grads."""
    from datetime import timedelta

    import torch.distributed as dist

    from _qwen2_vl_helpers import tiny_config
    from vlfuse.models.qwen2_vl import Qwen2VL
    from vlfuse.train.trainer import wrap_data_parallel

    torch.set_num_threads(1)
    # a collective that one rank never joins fails after the timeout instead of hanging the test
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = Qwen2VL(tiny_config()).train()
        wrapped = wrap_data_parallel(model, strategy, torch.device("cpu"))
        wrapped(**batches[rank]).logits.float().square().mean().backward()
        grads = {}
        for name, p in model.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.detach().clone()
        if rank == 0:
            torch.save(grads, out)
        # gloo aborts a rank ("terminate called without an active exception") now and then when it tears its
        # process group down while the other rank is still in a collective: both leave together
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rank_without_visuals_still_steps(tmp_path, strategy):
    """A text-only batch on one rank: the vision tower still runs there (zero gradients), so FSDP's gathers and
    DDP's reductions match across ranks, and the reduced gradients are the mean of the ranks' own."""
    from _qwen2_vl_helpers import patches, prompt, tiny_config
    from vlfuse.models.qwen2_vl import Qwen2VL

    torch.manual_seed(1)
    config = tiny_config()
    pixel_values, grid = patches([[1, 4, 6]], config)
    batches = [
        {"input_ids": prompt([3, ("image", [1, 4, 6]), 5]), "pixel_values": pixel_values, "image_grid_thw": grid},
        {"input_ids": prompt([14])},
    ]
    out = tmp_path / "grads.pt"
    mp.start_processes(_grads_worker, args=(2, _free_port(), strategy, batches, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    reduced = torch.load(out)
    torch.manual_seed(0)
    model = Qwen2VL(config).train()
    loss = sum(model(**batch).logits.float().square().mean() for batch in batches) / len(batches)
    loss.backward()
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(reduced[name], expected, rtol=1e-5, atol=1e-7, msg=name)
    assert model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

"""One training stage of Qwen2-VL: freezing, AdamW + warmup/cosine, accumulation, clipping, autocast, checkpoints
with exact resume, DDP / FSDP2, progress bar, metrics JSONL and a loss-curve PNG.

Launch one process (``python -m vlfuse train``) or several (``torchrun --nproc_per_node=N -m vlfuse train``): under
torchrun the ranks split each global batch, so N processes take the same optimizer steps as one process would on the
same global batch (the loss is normalised by the answer-token count of the whole global batch).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import checkpoint as ckpt
from . import config as config_mod
from .data import IGNORE_INDEX, BatchStream, JsonlDataset, SampleEncoder, collate, pixel_statistics, read_jsonl
from .optim import apply_freezing, build_optimizer, build_scheduler
from .progress import MetricsLog, ProgressBar, plot_loss


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no update was applied and the last good checkpoint is kept."""


def _init_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recomputes each transformer block (every entry of a ModuleList) in backward instead of storing activations."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def build_model(cfg: dict):
    from vlfuse.models.qwen2_vl import Qwen2VL, Qwen2VLConfig

    m = cfg["model"]
    if m["init"]:
        return Qwen2VL.from_pretrained(m["init"], backend=m["backend"], dtype=torch.float32).train()
    config = Qwen2VLConfig.preset(m["preset"]).replace(**m["overrides"])
    return Qwen2VL(config, backend=m["backend"])


def wrap_data_parallel(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The model wrapped for data-parallel training over the initialized process group: "ddp" (a replica per rank)
    or "fsdp" (FSDP2: each block of every ModuleList sharded on its own, then the rest of the model)."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(model)
        return model
    if strategy != "ddp":
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def build_processor(cfg: dict, model):
    """The processor of the run: the config's pixel bounds; its normalisation (``data.image_mean``/``image_std``)
    or else the init model's saved one or else CLIP's."""
    from vlfuse.models.qwen2_vl import Qwen2VLProcessor
    from vlfuse.models.qwen2_vl.processor import read_preprocessor_config
    from vlfuse.models.qwen2_vl.tokenizer import load_tokenizer

    init = cfg["model"]["init"]
    d = cfg["data"]
    norm = {k: v for k, v in read_preprocessor_config(init).items() if k in ("image_mean", "image_std")}
    if "corpus" in (d["image_mean"], d["image_std"]):
        paths = [d["train"]] if isinstance(d["train"], (str, Path)) else d["train"]
        mean, std = pixel_statistics([s for p in paths for s in read_jsonl(p, d["tasks"])])
        norm.update(image_mean=mean, image_std=std)
    for key in ("image_mean", "image_std"):
        if d[key] not in (None, "corpus"):
            norm[key] = d[key]
    tokenizer = load_tokenizer(init, model.config)
    return Qwen2VLProcessor(tokenizer, model.config, min_pixels=d["min_pixels"], max_pixels=d["max_pixels"], **norm)


class Trainer:
    """``Trainer(config, stage).train()`` runs (or, with ``resume=True``, continues) one stage; returns the folder of
    the final model (``<output>/final``, loadable by ``Qwen2VL.from_pretrained`` and transformers)."""

    def __init__(self, config: dict, stage: int | None = None):
        self.cfg = cfg = config_mod.resolve(config)
        self.stage = int(stage if stage is not None else cfg["stage"] or 0)
        self.rank, self.world, self.device = _init_distributed()
        self.output = Path(cfg["output"])
        batch = cfg["batch"]
        self.global_batch = batch["size"]
        self.accumulation = batch["accumulation"]
        if self.global_batch % (self.world * self.accumulation):
            raise ValueError(
                f"vlfuse train: batch.size {self.global_batch} must be a multiple of world size {self.world} x "
                f"accumulation {self.accumulation}"
            )
        if cfg["precision"] not in ("fp32", "bf16"):
            raise ValueError(f"vlfuse train: precision must be fp32 or bf16, got {cfg['precision']!r}")
        if not cfg["data"]["train"]:
            raise ValueError("vlfuse train: data.train (a JSONL file) is required")

        torch.manual_seed(cfg["seed"])
        self.model = build_model(cfg).to(self.device)
        self.processor = build_processor(cfg, self.model)
        self.encoder = SampleEncoder(self.processor)
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.model.config.eos_token_id
        self.dataset = JsonlDataset(cfg["data"]["train"], self.encoder, cfg["data"]["tasks"])
        self.stream = BatchStream(len(self.dataset), cfg["seed"])
        self.trainable = apply_freezing(self.model, self.stage)
        if cfg["gradient_checkpointing"]:
            enable_gradient_checkpointing(self.model)
        self.fsdp = self.world > 1 and cfg["distributed"]["strategy"] == "fsdp"
        self.wrapped = self._wrap(self.model)
        o, s = cfg["optim"], cfg["schedule"]
        self.optimizer = build_optimizer(self.model, o["lr"], o["weight_decay"], tuple(o["betas"]), o["eps"])
        self.scheduler = build_scheduler(self.optimizer, s["warmup"], s["steps"], s["min_lr_ratio"])
        self.total_steps = s["steps"]
        self.step = 0
        self.position = 0
        self.last_checkpoint: Path | None = None

    # ---- distribution ------------------------------------------------------------------------------------------

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        return wrap_data_parallel(model, "fsdp" if self.fsdp else "ddp", self.device)

    def _all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
        return value

    def _model_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _optimizer_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return self.optimizer.state_dict()

    def _load_states(self, model_state: dict, optimizer_state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, model_state, options=options)
            set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
            return
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state)

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def save(self) -> Path:
        model_state = self._model_state()
        optimizer_state = self._optimizer_state()
        rng = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rng, ckpt.rng_state())
        else:
            rng[0] = ckpt.rng_state()
        path = self.output / "checkpoints" / f"step_{self.step:07d}"
        if self.rank == 0:
            state = {
                "step": self.step,
                "position": self.position,
                "stage": self.stage,
                "world_size": self.world,
                "config": self.cfg,
            }
            path = ckpt.save_checkpoint(
                self.output,
                self.step,
                model_state,
                optimizer_state,
                self.scheduler.state_dict(),
                rng,
                state,
                keep=self.cfg["keep_checkpoints"],
            )
        if self.world > 1:
            dist.barrier()
        self.last_checkpoint = path
        return path

    def resume(self) -> bool:
        """Loads the newest complete checkpoint of ``output`` (partial saves are discarded); False if there is none."""
        if self.rank == 0:
            ckpt.remove_partial_saves(self.output)
        if self.world > 1:
            dist.barrier()
        path = ckpt.latest_checkpoint(self.output)
        if path is None:
            return False
        saved = ckpt.load_checkpoint(path)
        self._load_states(saved["model"], saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        rng = saved["rng"]
        if len(rng) == self.world:
            ckpt.set_rng_state(rng[self.rank])
        self.step = saved["state"]["step"]
        self.position = saved["state"]["position"]
        self.last_checkpoint = path
        return True

    # ---- training ----------------------------------------------------------------------------------------------

    def _micro_batches(self) -> list[dict]:
        indices = self.stream.indices(self.position, self.global_batch)
        local = indices[self.rank :: self.world]
        per = len(local) // self.accumulation
        return [
            collate([self.dataset[i] for i in local[k * per : (k + 1) * per]], self.pad_id)
            for k in range(self.accumulation)
        ]

    def _forward_loss_sum(self, batch: dict) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg["precision"] == "bf16"):
            logits = self.wrapped(**batch).logits
        logits = logits[:, :-1].float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns its metrics."""
        t0 = time.perf_counter()
        micro = self._micro_batches()
        counts = torch.tensor(
            [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
             sum(int(b["attention_mask"].sum()) for b in micro)],
            dtype=torch.float64,
        )
        label_tokens, tokens = (float(x) for x in self._all_sum(counts))
        # DDP (and FSDP) average gradients over ranks; scaling by world size turns that into the global-batch mean.
        scale = self.world / max(label_tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for k, batch in enumerate(micro):
            sync = k == len(micro) - 1 or self.world == 1 or self.fsdp
            context = contextlib.nullcontext() if sync else self.wrapped.no_sync()
            with context:
                part = self._forward_loss_sum(batch)
                (part * scale).backward()
            loss_sum += part.detach().to("cpu", torch.float64)
        loss = float(self._all_sum(loss_sum)) / max(label_tokens, 1.0)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            kept = self.last_checkpoint or "none (no checkpoint was saved yet)"
            raise TrainingDiverged(
                f"vlfuse train: stage {self.stage}: the loss is {loss} at step {self.step + 1}; stopped before that "
                f"update. The last good checkpoint is {kept}"
            )
        clip = self.cfg["optim"]["grad_clip"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        if clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        lrs = {g["part"]: g["lr"] for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.position += self.global_batch
        seconds = time.perf_counter() - t0
        record = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "tokens": int(tokens)}
        record.update({f"lr_{part}": lr for part, lr in lrs.items()})
        record.update({"seconds": seconds, "tokens_per_s": tokens / seconds})
        return record

    def train(self, resume: bool = False) -> Path:
        if resume:
            self.resume()
        main = self.rank == 0
        metrics = MetricsLog(self.output / "metrics.jsonl", resume_step=self.step, enabled=main)
        bar = ProgressBar(
            f"stage {self.stage}", self.total_steps, self.step, self.cfg["log_every"], enabled=main and self.cfg["progress"]
        )
        self.wrapped.train()
        save_every = self.cfg["save_every"]
        try:
            while self.step < self.total_steps:
                record = self.train_step()
                metrics.write(record)
                bar.update(self.step, record["loss"], record["tokens_per_s"])
                if save_every and self.step % save_every == 0 and self.step < self.total_steps:
                    self.save()
        finally:
            bar.close()
            metrics.close()
        self.save()
        final = self.output / "final"
        self.save_model(final)
        if main and (self.output / "metrics.jsonl").stat().st_size:
            plot_loss(self.output / "metrics.jsonl", self.output / "loss.png", f"stage {self.stage}")
        return final

    def save_model(self, folder: Path) -> None:
        """The trained model in the HF layout (what the next stage's ``model.init`` reads)."""
        state = self._model_state()
        if self.rank == 0:
            if self.fsdp:
                from vlfuse.models.qwen2_vl import Qwen2VL

                model = Qwen2VL(self.model.config, backend=self.model.backend)
                model.load_state_dict(state)
            else:
                model = self.model
            model.save_pretrained(folder)
            self.processor.save_pretrained(folder)
        if self.world > 1:
            dist.barrier()


"""``Qwen2VL``: vision tower + Qwen2 LLM with multimodal RoPE, HF checkpoint loading/saving, and generation."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import read_state_dict, write_state_dict
from .config import Qwen2VLConfig
from .positions import rope_index, text_positions
from .text import KVCache, TextModel
from ...nn.backends import BACKENDS
from .vision import VisionTransformer

__all__ = ["Qwen2VL", "Qwen2VLOutput"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Qwen2VLOutput:
    logits: Tensor  # [B, L, vocab]
    loss: Tensor | None = None  # mean next-token cross-entropy over labels != -100


def _data_parallel() -> bool:
    """Whether this process is one of several training ranks (torch.distributed set up with more than one)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Qwen2VL(nn.Module):
    """Qwen2-VL for conditional generation. Submodules: ``visual`` (the vision tower), ``language_model`` (the
    decoder), ``lm_head`` (tied to the embedding when ``config.tie_word_embeddings``).

    ``backend="vlfuse"`` runs the fused ops; ``"eager"`` runs the same weights through ``vlfuse.reference``.
    """

    def __init__(self, config: Qwen2VLConfig, backend: str = "vlfuse") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        config.validate()
        self.config = config
        self.backend = backend
        self.visual = VisionTransformer(config.vision, backend)
        self.language_model = TextModel(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # As HF: normal(0, initializer_range) for linear/embedding weights, zero biases; norms keep ones/zeros
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def set_gradient_checkpointing(self, enabled: bool = True) -> "Qwen2VL":
        """Recompute each vision block's and decoder layer's activations in backward instead of storing them."""
        self.visual.gradient_checkpointing = enabled
        self.language_model.gradient_checkpointing = enabled
        return self

    # ---- loading and saving ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, backend: str = "vlfuse", dtype: torch.dtype | str | None = None
    ) -> "Qwen2VL":
        """Loads HF Qwen2-VL safetensors (single or sharded; 4.x or 5.x key names) and config.json from ``folder``.
        ``dtype`` None keeps the checkpoint's dtype (config.json's, else that of its tensors). Every tensor is
        checked (names, shapes, truncation) before any is loaded; a bad checkpoint raises CheckpointError."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"vlfuse: checkpoint folder {folder!r} does not exist")
        config = Qwen2VLConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = cls(config, backend=backend)
        expected = {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}
        state = read_state_dict(folder, expected, tied=config.tie_word_embeddings)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype is None:
            dtype = _DTYPES.get(config.dtype or "") or next(iter(state.values())).dtype
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.language_model.embed_tokens.weight
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
        """Writes config.json and safetensors in HF's published key layout (readable by transformers 4.x and 5.x);
        shards with an index when the weights exceed ``max_shard_bytes``."""
        folder = os.fspath(folder)
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        write_state_dict(folder, state, max_shard_bytes)
        config = self.config.replace(dtype=str(self.dtype).removeprefix("torch."))
        config.save_pretrained(folder)

    # ---- forward -----------------------------------------------------------------------------------------------

    def _embed(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None,
        image_grid_thw: Tensor | None,
        pixel_values_videos: Tensor | None,
        video_grid_thw: Tensor | None,
    ) -> Tensor:
        """[B, L, width]: token embeddings, the image (video) pad tokens replaced by the vision tower's output.

        Images and videos go through the tower in one call (items of any size pack into one), so every step runs
        each vision block once whatever its batch holds: FSDP gathers a block's parameters once per call of it,
        and ranks whose batches differ in having videos must still make the same collective calls."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        embeds = self.language_model.embed_tokens(input_ids)
        c = self.config
        parts = []
        for name, pixels, grid, token in (
            ("image", pixel_values, image_grid_thw, c.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, c.video_token_id),
        ):
            slots = input_ids == token
            if pixels is None:
                if grid is not None:
                    raise ValueError(f"{name} grid_thw was given without its pixel values")
                if bool(slots.any()):
                    raise ValueError(f"the prompt has {name} pad tokens but no {name} pixel values were given")
                continue
            if grid is None:
                raise ValueError(f"{name} pixel values were given without their grid_thw")
            parts.append((name, pixels, grid, slots))
        if not parts:
            if self.training and torch.is_grad_enabled() and _data_parallel():
                # a rank whose batch has no visuals must still call every vision block, or FSDP's gathers of the
                # other ranks wait forever (and DDP misses the vision gradients it reduces): one merge window of
                # zeros through the tower, its output times zero, adds zero gradients
                m = c.vision.spatial_merge_size
                grid = torch.tensor([[1, m, m]])
                pixels = embeds.new_zeros(m * m, c.vision.patch_dim, dtype=self.visual.dtype)
                embeds = embeds + 0 * self.visual(pixels, grid).sum().to(embeds.dtype)
            return embeds
        features = self.visual(
            torch.cat([pixels.to(self.visual.dtype) for _, pixels, _, _ in parts]),
            torch.cat([grid.reshape(-1, 3) for _, _, grid, _ in parts]),
        )
        start = 0
        for name, _, grid, slots in parts:
            merged = int(grid.reshape(-1, 3).prod(-1).sum()) // c.vision.spatial_merge_size**2
            count = int(slots.sum())
            if count != merged:
                raise ValueError(
                    f"the prompt has {count} {name} pad tokens but the {name}s give {merged} visual tokens "
                    f"(grid_thw {grid.tolist()})"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), features[start : start + merged].to(embeds.dtype))
            start += merged
        return embeds

    def _positions(self, input_ids, image_grid_thw, video_grid_thw, attention_mask) -> tuple[Tensor, Tensor]:
        c = self.config
        return rope_index(
            input_ids,
            c.image_token_id,
            c.video_token_id,
            image_grid_thw,
            video_grid_thw,
            attention_mask,
            c.vision.spatial_merge_size,
        )

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Qwen2VLOutput:
        """input_ids [B, L] with one pad token per merged visual token; pixel_values [N, C*Tp*P*P] with
        image_grid_thw [images, 3] (likewise for videos); attention_mask [B, L] (0 = padding); labels [B, L]
        (-100 = ignored; the loss is next-token: logits at i predict labels at i + 1).
        Returns Qwen2VLOutput(logits [B, L, vocab], loss)."""
        self._check_length(input_ids.shape[1])
        embeds = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        positions, _ = self._positions(input_ids, image_grid_thw, video_grid_thw, attention_mask)
        hidden = self.language_model(embeds, positions, attention_mask)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return Qwen2VLOutput(logits=logits, loss=loss)

    def _check_length(self, length: int) -> None:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"the prompt has {length} tokens, longer than the model's context of {limit}")

    # ---- generation --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Returns [B, L + new]: the prompt followed by the generated tokens, as HF's ``generate``.

        Greedy by default; ``do_sample`` draws from softmax(logits / temperature) restricted to the ``top_k``
        tokens and the smallest set whose probability reaches ``top_p``. A row stops at an ``eos_token_id``
        (default: the config's; ``[]`` for none) and is filled with ``pad_token_id`` (default: the first eos id, else 0) afterwards;
        generation ends when every row has stopped, after ``max_new_tokens``, or at the context length.
        Batched prompts must be left-padded, with ``attention_mask`` marking the padding.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        B, L = input_ids.shape
        context = self.config.max_position_embeddings
        if L >= context:
            raise ValueError(f"the prompt has {L} tokens; the model's context is {context}, leaving no room to generate")
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("batched prompts must be left-padded (attention_mask ends in 0 for some row)")
        max_new_tokens = min(max_new_tokens, context - L)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.int64, device=input_ids.device)
        if pad_token_id is None:
            pad_token_id = int(eos_ids[0]) if eos_ids.numel() else 0

        c = self.config
        cache = KVCache(c.num_hidden_layers, B, c.num_key_value_heads, L + max_new_tokens, c.head_dim, self.dtype,
                        input_ids.device)
        embeds = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        positions, next_position = self._positions(input_ids, image_grid_thw, video_grid_thw, attention_mask)
        mask = attention_mask
        hidden = self.language_model(embeds, positions, mask, cache)
        logits = self.lm_head(hidden[:, -1]).float()

        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = _next_token(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            tokens.append(token[:, None])
            finished |= torch.isin(token, eos_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            embeds = self.language_model.embed_tokens(token[:, None])
            hidden = self.language_model(embeds, text_positions(next_position + step, 1), mask, cache)
            logits = self.lm_head(hidden[:, -1]).float()
        return torch.cat(tokens, dim=1)


def _next_token(
    logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None, generator
) -> Tensor:
    """logits [B, vocab] float32 -> token ids [B]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the most probable tokens until their mass reaches top_p (at least one)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

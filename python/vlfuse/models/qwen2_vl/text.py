"""The Qwen2 decoder of Qwen2-VL: RMSNorm, grouped-query attention with q/k/v biases and 3-axis multimodal RoPE
(``vlfuse.ops.rope`` with a [3, head_dim / 2] frequency matrix), SwiGLU MLP. Parameter names are HF's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ...nn import backends
from .config import Qwen2VLConfig
from .positions import mrope_freqs

__all__ = ["TextModel", "KVCache", "RMSNorm"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # statistics in float32, the weight applied in the input dtype (as HF's Qwen2RMSNorm rounds)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache:
    """Preallocated keys/values of every layer: [B, kv_heads, capacity, head_dim] each; ``length`` tokens filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device) -> None:
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.length = 0
        self.capacity = capacity

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Appends k, v [B, kv_heads, new, D] at ``length``; returns the layer's filled [B, kv_heads, length + new, D]."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class TextAttention(nn.Module):
    def __init__(self, config: Qwen2VLConfig, layer: int, backend: str) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.ops = backends.get(backend)
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, freqs: Tensor, mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        """x: [B, L, width]; positions: [B * L, 3]; freqs: [3, head_dim / 2]; mask: [B, 1, L, T] bool (True =
        attend) or None for plain causal attention over x alone. Returns [B, L, width]."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B * L, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B * L, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.ops.rope(q, k, positions, freqs)
        q = q.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = self.num_heads != self.num_kv_heads
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class TextMlp(nn.Module):
    def __init__(self, config: Qwen2VLConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"the Qwen2 MLP uses silu (SwiGLU), got hidden_act={config.hidden_act!r}")
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2VLConfig, layer: int, backend: str) -> None:
        super().__init__()
        self.self_attn = TextAttention(config, layer, backend)
        self.mlp = TextMlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, freqs: Tensor, mask: Tensor | None, cache: KVCache | None):
        x = x + self.self_attn(self.input_layernorm(x), positions, freqs, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embedding -> decoder layers -> final RMSNorm (HF's ``model.language_model``)."""

    def __init__(self, config: Qwen2VLConfig, backend: str = "vlfuse") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: Tensor,
        positions: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """inputs_embeds: [B, L, width]; positions: [3, B, L]; attention_mask: [B, T] over the cached tokens and
        these (T = cache length + L; 0 = padding) or None; returns the final hidden states [B, L, width]."""
        B, L, _ = inputs_embeds.shape
        c = self.config
        freqs = mrope_freqs(c.head_dim, c.rope_theta, c.mrope_section, device=inputs_embeds.device)
        flat_positions = positions.permute(1, 2, 0).reshape(B * L, 3)
        past = 0 if cache is None else cache.length
        mask = None
        if attention_mask is not None or past > 0:
            mask = _attention_mask(attention_mask, B, L, past, inputs_embeds.device)
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, flat_positions, freqs, mask, None, use_reentrant=False)
            else:
                x = layer(x, flat_positions, freqs, mask, cache)
        if cache is not None:
            cache.length += L
        return self.norm(x)


def _attention_mask(attention_mask: Tensor | None, B: int, L: int, past: int, device) -> Tensor:
    """[B, 1, L, past + L] bool: causal, padding keys masked. Every query also sees itself, so that the rows of
    padding tokens (which see no valid key) stay finite instead of turning into NaN that masked products spread."""
    total = past + L
    query = torch.arange(past, total, device=device).view(L, 1)
    key = torch.arange(total, device=device).view(1, total)
    mask = (key <= query).view(1, 1, L, total)
    if attention_mask is not None:
        valid = attention_mask.to(device=device, dtype=torch.bool).view(B, 1, 1, total)
        mask = (mask & valid) | (key == query).view(1, 1, L, total)
    return mask.expand(B, 1, L, total)

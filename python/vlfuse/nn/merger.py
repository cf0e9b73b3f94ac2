"""The patch merger of Qwen2-VL / Qwen2.5-VL vision towers, on the fused norm + window-merge op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends

__all__ = ["PatchMerger"]


class PatchMerger(nn.Module):
    """Norm every ViT token, concatenate each merge_size x merge_size window, then Linear -> GELU -> Linear.

    Drop-in for HF transformers' ``PatchMerger(dim, context_dim, spatial_merge_size)`` (Qwen2-VL, LayerNorm)
    and ``Qwen2_5_VLPatchMerger`` (RMSNorm): same constructor meaning and the same state dict keys
    (``ln_q.weight``, ``ln_q.bias`` (LayerNorm only), ``mlp.0.weight/bias``, ``mlp.2.weight/bias``), so their
    weights load unchanged.

    dim:         output width (the language model's hidden size)
    context_dim: ViT width C
    norm:        "layernorm" (Qwen2-VL) or "rmsnorm" (Qwen2.5-VL); eps 1e-6 as in both
    order:       "merge" (tokens already in Qwen2-VL patch order) or "raster" (row-major frames; needs grid_thw)
    backend:     "vlfuse" (the fused op) or "eager" (the reference; see vlfuse.nn.backends)
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        merge_size: int = 2,
        norm: str = "layernorm",
        order: str = "merge",
        backend: str = "vlfuse",
    ) -> None:
        super().__init__()
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"vlfuse.nn.PatchMerger: norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        if order not in ("merge", "raster"):
            raise ValueError(f"vlfuse.nn.PatchMerger: order must be 'merge' or 'raster', got {order!r}")
        self.ops = backends.get(backend)
        self.merge_size = merge_size
        self.norm = norm
        self.order = order
        self.hidden_size = context_dim * merge_size * merge_size
        # Plain torch norm modules hold the parameters under HF's names; forward never calls them.
        self.ln_q = nn.LayerNorm(context_dim, eps=1e-6) if norm == "layernorm" else nn.RMSNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, dim),
        )

    def forward(self, x: Tensor, grid_thw: Tensor | None = None) -> Tensor:
        """x: [S, context_dim], grid_thw: [items, 3] (t, h, w) or None for order="merge"
        -> [S / merge_size^2, dim]."""
        merged = self.ops.merge2x2(
            x,
            grid_thw,
            self.ln_q.weight,
            getattr(self.ln_q, "bias", None),
            eps=self.ln_q.eps,
            norm=self.norm,
            order=self.order,
            merge_size=self.merge_size,
        )  # [S / m^2, m^2 * C]
        fc1, fc2 = self.mlp[0], self.mlp[2]
        # The bias is added inside the GEMM (addmm's beta term); the exact GELU then runs in place on that
        # buffer unless autograd needs the pre-activation.
        hidden = F.linear(merged, fc1.weight, fc1.bias)  # [S / m^2, m^2 * C]
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden = F.gelu(hidden)
        else:
            hidden = torch.ops.aten.gelu_(hidden)
        return F.linear(hidden, fc2.weight, fc2.bias)  # [S / m^2, dim]

    def extra_repr(self) -> str:
        return f"merge_size={self.merge_size}, norm={self.norm!r}, order={self.order!r}, backend={self.ops.name!r}"

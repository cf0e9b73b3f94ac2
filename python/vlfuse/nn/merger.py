"""The patch merger of the Qwen VL vision towers, on the fused norm + window-merge op."""

from __future__ import annotations

from torch import Tensor, nn

from . import backends

__all__ = ["PatchMerger"]

# HF's parameter names: "qwen2" (Qwen2-VL, Qwen2.5-VL, Qwen3-Omni) ln_q + mlp.0 / mlp.2;
# "qwen3" (Qwen3-VL, Qwen3.5, Qwen4) norm + linear_fc1 / linear_fc2.
_NAMES = ("qwen2", "qwen3")


class PatchMerger(nn.Module):
    """Norm every ViT token, concatenate each merge_size x merge_size window, then Linear -> GELU -> Linear (both
    Linears through ``linear_act``).

    Drop-in for HF transformers' ``PatchMerger(dim, context_dim, spatial_merge_size)`` (Qwen2-VL, LayerNorm),
    ``Qwen2_5_VLPatchMerger`` (RMSNorm) and the Qwen3 generation's ``Qwen3VLVisionPatchMerger`` (LayerNorm; with
    ``use_postshuffle_norm=True`` the deepstack mergers): same computation and the same state dict keys, so their
    weights load unchanged.

    dim:              output width (the language model's hidden size)
    context_dim:      ViT width C
    norm:             "layernorm" (Qwen2-VL, Qwen3) or "rmsnorm" (Qwen2.5-VL); eps 1e-6 as in all of them
    order:            "merge" (tokens already in Qwen2-VL patch order) or "raster" (row-major frames; needs grid_thw)
    postshuffle_norm: False: the norm runs over each token's C (its weight is [C]); True: the m x m window is
                      concatenated first and the norm runs over the whole m^2 * C row (weight [m^2 * C])
    names:            HF's parameter names: "qwen2" (``ln_q``, ``mlp.0``, ``mlp.2``: Qwen2-VL, Qwen2.5-VL,
                      Qwen3-Omni) or "qwen3" (``norm``, ``linear_fc1``, ``linear_fc2``: Qwen3-VL, Qwen3.5, Qwen4)
    backend:          "vlfuse" (the fused op) or "eager" (the reference; see vlfuse.nn.backends)
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        merge_size: int = 2,
        norm: str = "layernorm",
        order: str = "merge",
        backend: str = "vlfuse",
        postshuffle_norm: bool = False,
        names: str = "qwen2",
    ) -> None:
        super().__init__()
        if norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"vlfuse.nn.PatchMerger: norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
        if order not in ("merge", "raster"):
            raise ValueError(f"vlfuse.nn.PatchMerger: order must be 'merge' or 'raster', got {order!r}")
        if names not in _NAMES:
            raise ValueError(f"vlfuse.nn.PatchMerger: names must be one of {_NAMES}, got {names!r}")
        self.ops = backends.get(backend)
        self.merge_size = merge_size
        self.norm_type = norm
        self.order = order
        self.postshuffle_norm = postshuffle_norm
        self.names = names
        self.hidden_size = context_dim * merge_size * merge_size
        # Plain torch modules hold the parameters under HF's names; forward calls only the Linears.
        norm_width = self.hidden_size if postshuffle_norm else context_dim
        norm_module = nn.LayerNorm(norm_width, eps=1e-6) if norm == "layernorm" else nn.RMSNorm(norm_width, eps=1e-6)
        fc1, fc2 = nn.Linear(self.hidden_size, self.hidden_size), nn.Linear(self.hidden_size, dim)
        if names == "qwen2":
            self.ln_q = norm_module
            self.mlp = nn.Sequential(fc1, nn.GELU(), fc2)
        else:
            self.norm = norm_module
            self.linear_fc1 = fc1
            self.act_fn = nn.GELU()
            self.linear_fc2 = fc2

    def _parts(self) -> tuple[nn.Module, nn.Linear, nn.Linear]:
        if self.names == "qwen2":
            return self.ln_q, self.mlp[0], self.mlp[2]
        return self.norm, self.linear_fc1, self.linear_fc2

    def forward(self, x: Tensor, grid_thw: Tensor | None = None) -> Tensor:
        """x: [S, context_dim], grid_thw: [items, 3] (t, h, w) or None for order="merge"
        -> [S / merge_size^2, dim]."""
        norm, fc1, fc2 = self._parts()
        # postshuffle_norm goes to the op only when set: the Qwen2 mergers call the op as it has always been called.
        postshuffle = {"postshuffle_norm": True} if self.postshuffle_norm else {}
        merged = self.ops.merge2x2(
            x,
            grid_thw,
            norm.weight,
            getattr(norm, "bias", None),
            eps=norm.eps,
            norm=self.norm_type,
            order=self.order,
            merge_size=self.merge_size,
            **postshuffle,
        )  # [S / m^2, m^2 * C]
        hidden = self.ops.linear_act(merged, fc1.weight, fc1.bias, "gelu")  # [S / m^2, m^2 * C]
        return self.ops.linear_act(hidden, fc2.weight, fc2.bias)  # [S / m^2, dim]

    def extra_repr(self) -> str:
        return (
            f"merge_size={self.merge_size}, norm={self.norm_type!r}, order={self.order!r}, "
            f"postshuffle_norm={self.postshuffle_norm}, names={self.names!r}, backend={self.ops.name!r}"
        )

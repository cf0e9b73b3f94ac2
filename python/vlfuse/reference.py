"""Plain eager PyTorch references, written from the math in the op documentation.

This module is the oracle: tests and benchmarks compare the fused ops against it, and the model package's
``backend="eager"`` runs on it. It imports nothing from vlfuse and shares no code with the kernels.
Every function computes in float32 (float64 for float64 inputs) and casts back, as the kernels do.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# rotary embedding
# ----------------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def vision_rope_freqs(head_dim: int, theta: float = 10000.0) -> Tensor:
    """[2, head_dim / 2] float32: pairs [0, Q) turn with the h position, [Q, 2Q) with w, Q = head_dim / 4."""
    half = head_dim // 2
    quarter = head_dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
    freqs = torch.zeros(2, half, dtype=torch.float32)
    freqs[0, :quarter] = inv_freq
    freqs[1, quarter : 2 * quarter] = inv_freq
    return freqs


def vision_positions(grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    """[S, 2] int64 (h, w) of every patch, in Qwen2-VL patch order (frames, h-blocks, w-blocks, window)."""
    rows = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).unsqueeze(1).expand(h, w)
        wpos = torch.arange(w).unsqueeze(0).expand(h, w)

        def to_merge_order(p: Tensor) -> Tensor:
            p = p.reshape(h // merge_size, merge_size, w // merge_size, merge_size)
            return p.permute(0, 2, 1, 3).flatten()

        hw = torch.stack([to_merge_order(hpos), to_merge_order(wpos)], dim=-1)
        rows.append(hw.repeat(t, 1))
    if not rows:
        return torch.zeros(0, 2, dtype=torch.int64)
    return torch.cat(rows)


def rope_angles(positions: Tensor, freqs: Tensor) -> Tensor:
    """[S, D/2]: angle_i = sum_a pos[a] * freqs[a, i]."""
    acc = torch.float64 if freqs.dtype == torch.float64 else torch.float32
    return (positions.to(acc).unsqueeze(-1) * freqs.to(acc)).sum(dim=-2)


def rope(x: Tensor, positions: Tensor, freqs: Tensor, inverse: bool = False) -> Tensor:
    """Rotates x [S, H, D] (rotate-half pairing) by the angles of positions [S, A] and freqs [A, D/2]."""
    half = x.shape[-1] // 2
    acc = _acc(x.dtype)
    angle = rope_angles(positions, freqs).to(acc)
    if inverse:
        angle = -angle
    cos = angle.cos().unsqueeze(1)
    sin = angle.sin().unsqueeze(1)
    xf = x.to(acc)
    lo, hi = xf[..., :half], xf[..., half:]
    return torch.cat([lo * cos - hi * sin, hi * cos + lo * sin], dim=-1).to(x.dtype)


def rope_qkv(qkv: Tensor, positions: Tensor, freqs: Tensor, num_heads: int, out_layout: str = "shd"):
    """qkv [S, 3*H*D] -> q, k, v [S, H, D] ("shd") or [H, S, D] ("hsd"), q and k rotated (contiguous), v a
    view of qkv's v block."""
    q, k, v = qkv.unflatten(1, (3, num_heads, -1)).unbind(1)
    q = rope(q, positions, freqs)
    k = rope(k, positions, freqs)
    if out_layout == "hsd":
        return q.transpose(0, 1).contiguous(), k.transpose(0, 1).contiguous(), v.transpose(0, 1)
    return q, k, v


def rope_cos_sin(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    """x * cos + rotate_half(x) * sin for q, k [S, H, D] with cos, sin [S, D], in float32."""

    def apply(x: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        acc = _acc(x.dtype)
        xf = x.to(acc)
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos.unsqueeze(1).to(acc) + rotated * sin.unsqueeze(1).to(acc)).to(x.dtype)

    return apply(q), apply(k)


# ----------------------------------------------------------------------------------------------------------
# temporal patchify (section owned by csrc/patchify)
# ----------------------------------------------------------------------------------------------------------


def patchify(
    frames: list[Tensor],
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """frames: list of [T, C, H, W] (uint8: pixel / 255, float: as is) -> patches [N, C*Tp*P*P], grid_thw [items, 3].

    Each item: normalize (x - mean) / std, repeat the last frame up to a multiple of Tp, then rows over
    (temporal pair, h-block, w-block, merge window row-major), each row a [C, Tp, P, P] block flattened.
    """
    acc = torch.float64 if out_dtype == torch.float64 else torch.float32
    P, Tp, m = patch_size, temporal_patch_size, merge_size
    rows, grids = [], []
    for f in frames:
        x = f.to(acc) / 255 if f.dtype == torch.uint8 else f.to(acc)
        x = (x - torch.tensor(mean, dtype=acc).view(-1, 1, 1)) / torch.tensor(std, dtype=acc).view(-1, 1, 1)
        T, C, H, W = x.shape
        pad = -T % Tp
        x = torch.cat([x, x[-1:].expand(pad, C, H, W)]) if pad else x
        gt, gh, gw = x.shape[0] // Tp, H // P, W // P
        x = x.reshape(gt, Tp, C, gh // m, m, P, gw // m, m, P)
        # -> (t, h-block, w-block, window row, window col | C, Tp, row, col)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows.append(x.reshape(gt * gh * gw, C * Tp * P * P).to(out_dtype))
        grids.append([gt, gh, gw])
    return torch.cat(rows), torch.tensor(grids, dtype=torch.int64)


def patch_embed(patches: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """patches [N, K] (cast to weight's dtype) @ weight [E, C, Tp, P, P] flattened to [E, K], transposed, + bias."""
    acc = _acc(weight.dtype)
    x = patches.to(weight.dtype).to(acc)
    out = x @ weight.reshape(weight.shape[0], -1).to(acc).t()
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(weight.dtype)



# ----------------------------------------------------------------------------------------------------------
# 2x2 token merge (section owned by csrc/merge)
# ----------------------------------------------------------------------------------------------------------


def raster_merge_index(grid_thw: Tensor, merge_size: int = 2) -> Tensor:
    """[S] int64: the token (row of a raster-ordered x) that lands at each position of merge order.

    Each frame of each item is row-major over (h, w); merge order runs over frames, h-blocks, w-blocks, and
    the m x m window row-major.
    """
    m = merge_size
    parts, start = [], 0
    for t, h, w in grid_thw.tolist():
        idx = torch.arange(start, start + t * h * w).reshape(t, h // m, m, w // m, m)
        parts.append(idx.permute(0, 1, 3, 2, 4).flatten())
        start += t * h * w
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def merge2x2(
    x: Tensor,
    grid_thw: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    eps: float = 1e-6,
    norm: str = "layernorm",
    order: str = "merge",
    merge_size: int = 2,
    postshuffle_norm: bool = False,
) -> Tensor:
    """x [S, C] -> [S / m^2, m^2 * C]: every token normalized (statistics in float32), then each m x m window
    concatenated; order="raster" first gathers raster-ordered tokens into merge order. postshuffle_norm
    concatenates first and normalizes each merged row of m^2 * C values (weight, bias [m^2 * C])."""
    acc = _acc(x.dtype)
    rows = x.to(acc)
    if order == "raster":
        rows = rows[raster_merge_index(grid_thw, merge_size).to(x.device)]
    if postshuffle_norm:
        rows = rows.reshape(-1, merge_size * merge_size * x.shape[-1])
    if norm == "layernorm":
        mean = rows.mean(dim=-1, keepdim=True)
        var = (rows - mean).square().mean(dim=-1, keepdim=True)
        y = (rows - mean) * torch.rsqrt(var + eps) * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
    elif norm == "rmsnorm":
        y = rows * torch.rsqrt(rows.square().mean(dim=-1, keepdim=True) + eps) * weight.to(acc)
    else:
        raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {norm!r}")
    return y.to(x.dtype).reshape(-1, merge_size * merge_size * x.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# learned position table resampling (section owned by csrc/pos_embed)
# ----------------------------------------------------------------------------------------------------------


def _bilinear_axis(n: int, side: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Taps (lo, hi) and weights of the n target positions of one axis into `side` table entries, align_corners
    (target 0 -> entry 0, target n - 1 -> entry side - 1), in float32: src = r * (side - 1) / (n - 1)."""
    r = torch.arange(n, dtype=torch.float32)
    src = r * (side - 1) / torch.full((n,), max(n - 1, 1), dtype=torch.float32)
    lo = src.floor()
    w_lo = 1 - (src - lo)
    lo = lo.long().clamp(0, side - 1)
    return lo, (lo + 1).clamp(max=side - 1), w_lo, 1 - w_lo


def interp_pos_embed(
    table: Tensor, grid_thw: Tensor, merge_size: int = 2, bias: Tensor | None = None, tokens: int | None = None
) -> Tensor:
    """table [side * side, C] -> [N, C], N = sum of t * h * w: per item, the table seen as a [side, side] grid
    bilinearly resampled to [h, w] (align_corners=True; the weights are products of the float32 axis weights),
    put in merge order (m x m blocks row-major, each block row-major) and repeated for each of the t frames; plus
    bias. Sums in float32 (float64 for float64), cast to table's dtype once. tokens, when given, must equal N."""
    side = int(round(table.shape[0] ** 0.5))
    C, m = table.shape[1], merge_size
    acc = _acc(table.dtype)
    grid = table.to(acc).reshape(side, side, C)
    parts = []
    for t, h, w in grid_thw.tolist():
        row_lo, row_hi, row_w_lo, row_w_hi = _bilinear_axis(h, side)
        col_lo, col_hi, col_w_lo, col_w_hi = _bilinear_axis(w, side)
        frame = torch.zeros(h, w, C, dtype=acc, device=table.device)
        for rows, row_w in ((row_lo, row_w_lo), (row_hi, row_w_hi)):
            for cols, col_w in ((col_lo, col_w_lo), (col_hi, col_w_hi)):
                weight = (row_w[:, None] * col_w[None, :]).to(acc).to(table.device)
                frame = frame + grid[rows.to(table.device)][:, cols.to(table.device)] * weight[..., None]
        frame = frame.reshape(h // m, m, w // m, m, C).permute(0, 2, 1, 3, 4).reshape(h * w, C)
        parts.append(frame.repeat(t, 1))
    out = torch.cat(parts) if parts else torch.zeros(0, C, dtype=acc, device=table.device)
    if tokens is not None and tokens != out.shape[0]:
        raise ValueError(f"tokens = {tokens} but grid_thw describes {out.shape[0]} tokens")
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(table.dtype)


# ----------------------------------------------------------------------------------------------------------
# Linear + activation
# ----------------------------------------------------------------------------------------------------------


def activation(x: Tensor, act: str) -> Tensor:
    """The activations linear_act takes, from their formulas."""
    if act == "none":
        return x
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if act == "silu":
        return x * torch.sigmoid(x)
    if act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / 2.0**0.5))
    if act == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    raise ValueError(f"unknown activation {act!r}")


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None, act: str = "none") -> Tensor:
    """act(x [..., K] @ weight [N, K]^T + bias [N]) -> [..., N], in float32 (float64 for float64) and cast back."""
    acc = _acc(x.dtype)
    out = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        out = out + bias.to(acc)
    return activation(out, act).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Attention within packed segments
# ----------------------------------------------------------------------------------------------------------


def segment_attention(q: Tensor, k: Tensor, v: Tensor, groups, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T) v over each segment alone, in float32 (float64 for float64), rounded once.

    q, k, v: [H, S, D]; groups: ((first token, segment count, segment length), ...) tiling [0, S);
    returns [S, H * D] in q's dtype."""
    H, S, D = q.shape
    scale = D**-0.5 if scale is None else scale
    acc = _acc(q.dtype)
    out = []
    for start, count, length in groups:
        for seg in range(count):
            lo = start + seg * length
            qs, ks, vs = (t[:, lo : lo + length].to(acc) for t in (q, k, v))
            weights = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
            out.append((weights @ vs).transpose(0, 1).reshape(length, H * D))
    return (torch.cat(out) if out else q.new_zeros(0, H * D, dtype=acc)).to(q.dtype)

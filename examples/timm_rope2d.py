"""Turn a timm ViT into a RoPE-2D ViT with 2x2 token merging, on vlfuse.nn modules.

timm's VisionTransformer keeps tokens in raster order, adds a learned absolute position table and runs one image
size per batch. The converted model keeps its trained weights (patch embedding, qkv/proj, norms, MLPs) and changes
three things, each a vlfuse.nn module:

- ``PatchEmbed3d`` takes the Conv2d patch embedding (a Conv3d with temporal_patch_size=1) as one GEMM over patch rows;
- ``RotaryAttention2D`` replaces each block's attention: the same qkv and proj Linears, RoPE-2D on the (h, w) patch
  position fused into the qkv split, attention restricted to each image, so images of different sizes are packed
  into one call with no padding and no per-image loop;
- ``PatchMerger(order="raster")`` norms the final tokens and concatenates each 2x2 window (a gather in raster order)
  before an MLP, so the output has 4x fewer tokens.

The learned position table is dropped (RoPE-2D carries the positions), so the converted model needs fine-tuning
before its features mean anything; this script builds a small ViT with random weights, converts it, runs two
images of different sizes, checks the result against a plain-PyTorch computation of the same model, and runs a
backward pass.

    PYTHONPATH=python python examples/timm_rope2d.py
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vlfuse
import vlfuse.nn as vnn
from vlfuse import reference


def raster_patches(images: list[Tensor], patch_size: int) -> tuple[Tensor, Tensor]:
    """images: list of [C, H, W] (H, W multiples of patch_size) -> patch rows [N, C * P * P] in raster order
    (per image row-major over the patch grid, each row laid out as Conv2d weights expect: channel, row, column)
    and grid_thw [images, 3] = (1, H / P, W / P)."""
    rows, grids = [], []
    for image in images:
        c, h, w = image.shape
        hp, wp = h // patch_size, w // patch_size
        patches = image.reshape(c, hp, patch_size, wp, patch_size).permute(1, 3, 0, 2, 4)  # [hp, wp, C, P, P]
        rows.append(patches.reshape(hp * wp, c * patch_size * patch_size))
        grids.append((1, hp, wp))
    return torch.cat(rows), torch.tensor(grids, dtype=torch.int64)


def raster_positions(grid_thw: Tensor) -> Tensor:
    """[S, 2] (h, w) position of every token, raster order, frames of an item repeating the same positions."""
    positions = []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions.append(torch.stack([hh.flatten(), ww.flatten()], dim=-1).repeat(t, 1))
    return torch.cat(positions)


def frame_seqlens(grid_thw: Tensor) -> Tensor:
    """[frames + 1] cumulative token counts: each frame attends only to its own tokens."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0), (1, 0))


class RopeBlock(nn.Module):
    """A timm ``Block`` (pre-norm attention + MLP, optional LayerScale / DropPath) on packed tokens [S, C], its
    attention swapped for ``RotaryAttention2D`` that shares the block's qkv and proj Linears."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        attn = block.attn
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            raise NotImplementedError("RopeBlock: timm attention with qk_norm is not converted by this example")
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.ls1, self.ls2, self.drop_path1, self.drop_path2 = block.ls1, block.ls2, block.drop_path1, block.drop_path2
        self.attn = vnn.RotaryAttention2D(attn.qkv.in_features, attn.num_heads, bias=attn.qkv.bias is not None)
        self.attn.qkv, self.attn.proj = attn.qkv, attn.proj  # the trained weights, same keys (qkv.*, proj.*)

    def forward(self, x: Tensor, positions: Tensor, freqs: Tensor, cu_seqlens: Tensor) -> Tensor:
        # x: [S, C] -> [S, C]
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), positions, freqs, cu_seqlens)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class RoPE2DViT(nn.Module):
    """A timm VisionTransformer's weights with RoPE-2D attention and a 2x2 patch merger; images of any size
    (multiples of 2 * patch_size per side) packed into one call.

    forward(images: list of [C, H, W]) -> (tokens [sum(H * W / P^2) / 4, out_dim], grid_thw [images, 3])
    """

    def __init__(self, vit: nn.Module, out_dim: int, merge_size: int = 2) -> None:
        super().__init__()
        if vit.cls_token is not None or vit.reg_token is not None:
            raise NotImplementedError("RoPE2DViT: build the timm ViT with class_token=False and no register tokens")
        conv = vit.patch_embed.proj  # Conv2d [E, C, P, P], kernel = stride
        embed_dim, in_channels, patch_size, _ = conv.weight.shape
        self.patch_size = patch_size
        self.patch_embed = vnn.PatchEmbed3d(
            patch_size, temporal_patch_size=1, in_channels=in_channels, embed_dim=embed_dim, bias=conv.bias is not None
        )
        with torch.no_grad():
            self.patch_embed.proj.weight.copy_(conv.weight.unsqueeze(2))  # [E, C, 1, P, P]
            if conv.bias is not None:
                self.patch_embed.proj.bias.copy_(conv.bias)
        self.blocks = nn.ModuleList(RopeBlock(block) for block in vit.blocks)
        self.norm = vit.norm
        self.merger = vnn.PatchMerger(out_dim, embed_dim, merge_size=merge_size, norm="layernorm", order="raster")
        head_dim = embed_dim // self.blocks[0].attn.num_heads
        self.register_buffer("freqs", vlfuse.ops.vision_rope_freqs(head_dim), persistent=False)  # [2, head_dim / 2]

    def forward(self, images: list[Tensor]) -> tuple[Tensor, Tensor]:
        patches, grid_thw = raster_patches(images, self.patch_size)
        positions, cu_seqlens = raster_positions(grid_thw), frame_seqlens(grid_thw)
        x = self.patch_embed(patches)  # [S, E]
        for block in self.blocks:
            x = block(x, positions, self.freqs, cu_seqlens)
        return self.merger(self.norm(x), grid_thw), grid_thw  # [S / 4, out_dim]


def eager_forward(model: RoPE2DViT, images: list[Tensor]) -> Tensor:
    """The same model in plain PyTorch (Conv2d patches, reference rotary, per-image attention, LayerNorm + gather):
    the oracle the vlfuse path is checked against."""
    conv_weight = model.patch_embed.proj.weight.squeeze(2)
    outputs = []
    for image in images:
        x = F.conv2d(image[None], conv_weight, model.patch_embed.proj.bias, stride=model.patch_size)  # [1, E, hp, wp]
        _, _, hp, wp = x.shape
        x = x.flatten(2)[0].t()  # [hp * wp, E] raster order
        grid = torch.tensor([[1, hp, wp]])
        positions = raster_positions(grid)
        for block in model.blocks:
            attn = block.attn
            q, k, v = reference.rope_qkv(attn.qkv(block.norm1(x)), positions, model.freqs, attn.num_heads, "hsd")
            a = F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(hp * wp, -1)
            x = x + block.ls1(attn.proj(a))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        merger = model.merger
        x = F.layer_norm(model.norm(x), x.shape[-1:], merger.ln_q.weight, merger.ln_q.bias, merger.ln_q.eps)
        m = merger.merge_size
        x = x.reshape(hp // m, m, wp // m, m, -1).permute(0, 2, 1, 3, 4).reshape(hp * wp // (m * m), -1)
        outputs.append(merger.mlp(x))
    return torch.cat(outputs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="timm ViT -> RoPE-2D ViT with 2x2 merging on vlfuse.nn")
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--out-dim", type=int, default=256, help="merger output width (e.g. an LLM's)")
    parser.add_argument("--sizes", default="224x224,160x288", help="image sizes HxW, multiples of 32")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
        class_token=False, global_pool="avg", num_classes=0,
    )  # fmt: skip
    model = RoPE2DViT(vit, out_dim=args.out_dim).eval()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    images = [torch.rand(3, h, w) for h, w in sizes]

    with torch.no_grad():
        tokens, grid_thw = model(images)
        expected = eager_forward(model, images)
    error = (tokens - expected).abs().max().item()
    print(f"timm ViT depth {args.depth}, width {args.embed_dim}, {args.heads} heads -> RoPE-2D ViT + 2x2 merger")
    for (h, w), (_, hp, wp) in zip(sizes, grid_thw.tolist()):
        print(f"  image {h}x{w}: {hp}x{wp} patches -> {hp * wp // 4} merged tokens")
    print(f"  output {tuple(tokens.shape)}; max |vlfuse - plain PyTorch| = {error:.2e}")
    torch.testing.assert_close(tokens, expected, rtol=1e-4, atol=1e-4)

    model.train()
    tokens, _ = model(images)
    tokens.square().mean().backward()
    grad = model.patch_embed.proj.weight.grad
    print(f"  backward ok: |grad patch_embed| = {grad.norm():.3e}, |grad qkv[0]| = {model.blocks[0].attn.qkv.weight.grad.norm():.3e}")


if __name__ == "__main__":
    main()

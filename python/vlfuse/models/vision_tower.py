"""The vision tower of the Qwen VL family: patch embedding (+ a learned position table) -> blocks (norm, RoPE-2D
attention within each frame or window, norm, MLP) -> m x m patch merger (+ deepstack mergers on chosen blocks). One
definition, parameterized by what the generations change (see ``Qwen2VLVisionConfig``):

- Qwen2-VL: LayerNorm, quick-GELU MLP, attention within each frame;
- Qwen2.5-VL: RMSNorm, SwiGLU MLP, attention within windows except in the full-attention blocks;
- the Qwen3 generation (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, Qwen3-Omni's vision encoder, Qwen4): a Conv3d
  bias, a learned square position table resampled to every grid, tanh-GELU MLP, and (Qwen3-VL, Qwen3-VL-MoE,
  Qwen3-Omni) deepstack mergers whose outputs the LLM adds to its early layers.

Parameter names are HF's (``patch_embed.proj``, ``pos_embed``, ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1`` /
``linear_fc1`` / ``gate_proj``..., ``merger.ln_q`` / ``merger.norm``, ``deepstack_merger_list.N`` /
``merger_list.N``...), so HF weights load unchanged.

Each call computes a :class:`~vlfuse.models.vision_plan.VisionPlan` once from the grid (or takes one built ahead);
every block reuses it, and nothing in the blocks reads the device back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import reference
from ..nn import PatchEmbed3d, PatchMerger, RotaryAttention2D, backends
from ..nn.attention import SegmentLayout
from ..ops.linear_act import HF_ACTIVATIONS, cpu_gemm_is_native
from .vision_plan import VisionPlan

if TYPE_CHECKING:  # the config module's package imports this one
    from .qwen2_vl.config import Qwen2VLVisionConfig

__all__ = ["VisionFeatures", "VisionTower", "activation"]


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The MLP activation by its HF name (``hidden_act``), as a function of one tensor: what the MLPs' first Linear
    applies in ``vlfuse.ops.linear_act``."""
    act = _op_activation(name)
    return lambda x: reference.activation(x, act)


def _op_activation(name: str) -> str:
    """linear_act's name for HF's ``hidden_act``."""
    try:
        return HF_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} ({', '.join(HF_ACTIVATIONS)})") from None


def _add_linear_(x: Tensor, h: Tensor, linear: nn.Linear, ops: backends.Backend) -> Tensor:
    """x += h @ W^T + b in place: the residual add rides in the GEMM (addmm_'s beta = 1), with no [S, C] temporary.
    A reduced type on a CPU without a native GEMM for it adds linear_act's result instead (its float32 route)."""
    if x.is_cpu and not cpu_gemm_is_native(x.dtype):
        return x.add_(ops.linear_act(h, linear.weight, linear.bias))
    if linear.bias is not None:
        x.add_(linear.bias)
    return x.addmm_(h, linear.weight.t())


class VisionMlp(nn.Module):
    """fc2(act(fc1(x))) (Qwen2-VL; the Qwen3 generation names the Linears linear_fc1 and linear_fc2: names=), fc1
    and its activation as one ``linear_act``."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        hidden_act: str,
        names: tuple[str, str] = ("fc1", "fc2"),
        backend: str = "vlfuse",
    ) -> None:
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(dim, hidden_dim))
        setattr(self, names[1], nn.Linear(hidden_dim, dim))
        self.act = _op_activation(hidden_act)
        self.ops = backends.get(backend)

    @property
    def first(self) -> nn.Linear:
        return getattr(self, self.names[0])

    @property
    def out(self) -> nn.Linear:
        return getattr(self, self.names[1])

    def hidden(self, x: Tensor) -> Tensor:
        """[S, hidden_dim]: what the second Linear takes."""
        return self.ops.linear_act(x, self.first.weight, self.first.bias, self.act)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x))


class GatedVisionMlp(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) (Qwen2.5-VL's SwiGLU, with biases); gate_proj and its activation
    as one ``linear_act``."""

    def __init__(self, dim: int, hidden_dim: int, hidden_act: str, backend: str = "vlfuse") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim)
        self.up_proj = nn.Linear(dim, hidden_dim)
        self.down_proj = nn.Linear(hidden_dim, dim)
        self.act = _op_activation(hidden_act)
        self.ops = backends.get(backend)

    @property
    def out(self) -> nn.Linear:
        return self.down_proj

    def hidden(self, x: Tensor) -> Tensor:
        """[S, hidden_dim]: what down_proj takes."""
        # linear_act keeps what its backward needs apart from its output, so the product may overwrite it
        gate = self.ops.linear_act(x, self.gate_proj.weight, self.gate_proj.bias, self.act)
        return gate.mul_(self.ops.linear_act(x, self.up_proj.weight, self.up_proj.bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.hidden(x))


def _norm(config: Qwen2VLVisionConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.embed_dim, eps=1e-6)
    return nn.LayerNorm(config.embed_dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, config: Qwen2VLVisionConfig, backend: str) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.norm2 = _norm(config)
        self.attn = RotaryAttention2D(config.embed_dim, config.num_heads, bias=True, backend=backend)
        if config.gated_mlp:
            self.mlp = GatedVisionMlp(config.embed_dim, config.mlp_dim, config.hidden_act, backend)
        else:
            names = ("fc1", "fc2") if config.param_names == "qwen2" else ("linear_fc1", "linear_fc2")
            self.mlp = VisionMlp(config.embed_dim, config.mlp_dim, config.hidden_act, names, backend)

    def forward(
        self, x: Tensor, positions: Tensor, freqs: Tensor, segments: SegmentLayout, inplace: bool = False
    ) -> Tensor:
        """x [S, C] -> [S, C]. inplace (inference only: nothing may need x's old value) updates x where it is: both
        residual adds ride in the output projections' GEMMs, which saves two passes over [S, C] and their
        temporaries per block."""
        if not inplace:
            x = x + self.attn(self.norm1(x), positions, freqs, segments)
            return x + self.mlp(self.norm2(x))
        _add_linear_(x, self.attn.attend(self.norm1(x), positions, freqs, segments), self.attn.proj, self.attn.ops)
        return _add_linear_(x, self.mlp.hidden(self.norm2(x)), self.mlp.out, self.attn.ops)


@dataclass(frozen=True, eq=False)
class VisionFeatures:
    """What one tower call computes (HF's output names in brackets), all in patch order.

    merged:    [N / m^2, hidden_size] the merger's tokens, what the LLM takes (``pooler_output``)
    deepstack: one [N / m^2, hidden_size] per deepstack block that ran, in block order (``deepstack_features``);
               empty for a tower without deepstack mergers
    hidden:    [N, embed_dim] the last block's output (``last_hidden_state``) when asked for, else None
    """

    merged: Tensor
    deepstack: tuple[Tensor, ...] = ()
    hidden: Tensor | None = None


class VisionTower(nn.Module):
    """``tower(pixel_values, grid_thw)``: pixel_values [N, C * Tp * P * P] (patches in Qwen2-VL order, as HF's
    processors emit them), grid_thw [items, 3] (t, h, w in patches) -> merged tokens [N / m^2, hidden_size].
    ``tower.features(...)`` returns the deepstack features and the last hidden state too (:class:`VisionFeatures`).

    backend: "vlfuse" (fused ops) or "eager" (the same weights through the reference; see vlfuse.nn.backends).
    """

    def __init__(self, config: Qwen2VLVisionConfig, backend: str = "vlfuse") -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.ops = backends.get(backend)
        self.patch_embed = PatchEmbed3d(
            in_channels=config.in_channels,
            embed_dim=config.embed_dim,
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
            bias=config.patch_bias,
            backend=backend,
        )
        if config.num_position_embeddings:
            self.pos_embed = nn.Embedding(config.num_position_embeddings, config.embed_dim)
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList(VisionBlock(config, backend) for _ in range(config.depth))
        merger_names = "qwen3" if config.param_names == "qwen3" else "qwen2"
        self.merger = PatchMerger(
            config.hidden_size, config.embed_dim, merge_size=config.spatial_merge_size, norm=config.norm,
            backend=backend, names=merger_names,
        )  # fmt: skip
        self._deepstack_name = "merger_list" if config.param_names == "qwen3_omni" else "deepstack_merger_list"
        if config.deepstack_visual_indexes:
            deepstack = nn.ModuleList(
                PatchMerger(
                    config.hidden_size, config.embed_dim, merge_size=config.spatial_merge_size, norm=config.norm,
                    backend=backend, postshuffle_norm=True, names=merger_names,
                )  # fmt: skip
                for _ in config.deepstack_visual_indexes
            )
            self.add_module(self._deepstack_name, deepstack)
        # block index -> its deepstack merger: the first position of the block in the list, as HF's .index()
        indexes = list(config.deepstack_visual_indexes)
        self.deepstack_at = {i: indexes.index(i) for i in range(config.depth) if i in indexes}
        full = set(config.fullatt_block_indexes)
        self.windowed = tuple(bool(config.window_units) and i not in full for i in range(config.depth))
        self.gradient_checkpointing = False

    @property
    def deepstack_mergers(self) -> nn.ModuleList | None:
        """The deepstack mergers (HF's ``deepstack_merger_list``, Qwen3-Omni's ``merger_list``), or None."""
        return self._modules.get(self._deepstack_name)

    @property
    def backend(self) -> str:
        return self.ops.name

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @classmethod
    def from_hf(cls, hf_tower: nn.Module, backend: str = "vlfuse", share_parameters: bool = False) -> VisionTower:
        """A tower holding the weights of an HF vision tower (``model.visual``): Qwen2-VL's, Qwen2.5-VL's, or the
        Qwen3 generation's (``Qwen3VLVisionModel``, ``Qwen3VLMoeVisionModel``, ``Qwen3_5VisionModel``,
        ``Qwen3_5MoeVisionModel``, ``Qwen3OmniMoeVisionEncoder``, ``Qwen4ExpVisionModel``), read from its config.

        share_parameters: False copies them (an independent module on the same device and dtype); True makes the
        new tower use HF's very Parameter objects (nothing is allocated; training either trains both).
        """
        from .qwen2_vl.config import Qwen2VLVisionConfig

        config = Qwen2VLVisionConfig.from_hf_dict(hf_tower.config.to_dict())
        parameters = dict(hf_tower.named_parameters())
        if not share_parameters:
            tower = cls(config, backend)
            state = {k: v for k, v in hf_tower.state_dict().items() if not k.startswith("rotary_pos_emb.")}
            tower.load_state_dict(state)
            reference = next(iter(parameters.values()))
            return tower.to(device=reference.device, dtype=reference.dtype)
        with torch.device("meta"):
            tower = cls(config, backend)
        names = {name for name, _ in tower.named_parameters()}
        if names != set(parameters):
            raise ValueError(
                f"vlfuse: {type(hf_tower).__name__}'s parameters do not match the tower's: "
                f"missing {sorted(names - set(parameters))[:4]}, unexpected {sorted(set(parameters) - names)[:4]}"
            )
        for name, parameter in parameters.items():
            owner, _, leaf = name.rpartition(".")
            tower.get_submodule(owner)._parameters[leaf] = parameter
        return tower

    def rope_freqs(self, device: torch.device) -> Tensor:
        """[2, head_dim / 2] float32 RoPE-2D frequency matrix (h pairs, then w pairs). Computed per call rather than
        held as a buffer, which ``model.to(bfloat16)`` would round; override it to change the rotation."""
        return self.ops.vision_rope_freqs(self.config.head_dim, self.config.rope_theta, device=device)

    def plan(
        self, grid_thw: Tensor | Sequence[Sequence[int]], max_tokens: int | None = None, device=None
    ) -> VisionPlan:
        """The plan of a call on grid_thw (see VisionPlan.build): build it ahead, e.g. in a data loader, and pass it
        as ``plan=`` so that the forward reads nothing from the device."""
        c = self.config
        device = self.patch_embed.proj.weight.device if device is None else device
        return VisionPlan.build(grid_thw, c.spatial_merge_size, c.window_units, device, max_tokens)

    def _check(self, pixel_values: Tensor, plan: VisionPlan) -> None:
        c = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != c.patch_dim:
            raise ValueError(
                f"pixel_values must be [patches, {c.patch_dim}] (C * Tp * P * P), got {tuple(pixel_values.shape)}"
            )
        if plan.merge_size != c.spatial_merge_size or (plan.window is None) != (c.window_units == 0):
            raise ValueError(
                f"the plan was built for merge size {plan.merge_size} and "
                f"{'no windows' if plan.window is None else 'windowed attention'}; this tower needs merge size "
                f"{c.spatial_merge_size} and {'windowed attention' if c.window_units else 'no windows'}: "
                "build it with tower.plan(grid_thw)"
            )
        plan.check(pixel_values)

    def forward(
        self,
        pixel_values: Tensor,
        grid_thw: Tensor | Sequence[Sequence[int]] | None = None,
        *,
        plan: VisionPlan | None = None,
        max_tokens: int | None = None,
    ) -> Tensor:
        """pixel_values [N, patch_dim]; grid_thw [items, 3], or plan= one built by :meth:`plan`;
        max_tokens: encode in chunks of whole frames of at most that many patches (see VisionPlan.build).
        Returns the merged tokens [N / m^2, hidden_size] in patch order."""
        return self.features(pixel_values, grid_thw, plan=plan, max_tokens=max_tokens).merged

    def features(
        self,
        pixel_values: Tensor,
        grid_thw: Tensor | Sequence[Sequence[int]] | None = None,
        *,
        plan: VisionPlan | None = None,
        max_tokens: int | None = None,
        hidden_order: str | None = None,
    ) -> VisionFeatures:
        """As forward, returning everything HF's tower returns (:class:`VisionFeatures`): the merged tokens, the
        deepstack features, and the last block's hidden states [N, embed_dim] when hidden_order says in which
        order: "patch" (HF Qwen2-VL's and the Qwen3 generation's last_hidden_state) or "window" (HF Qwen2.5-VL's);
        None skips them."""
        if plan is None:
            if grid_thw is None:
                raise ValueError("VisionTower: pass grid_thw [items, 3] or a plan built by tower.plan(grid_thw)")
            plan = self.plan(grid_thw, max_tokens)
        elif max_tokens is not None:
            raise ValueError("VisionTower: with a plan, give max_tokens to tower.plan(grid_thw, max_tokens) instead")
        if hidden_order not in (None, "patch", "window"):
            raise ValueError(f"VisionTower: hidden_order must be None, 'patch' or 'window', got {hidden_order!r}")
        self._check(pixel_values, plan)
        if not plan.chunks:
            return self._run(pixel_values, plan, hidden_order)
        parts = [self._run(pixel_values[start:end], chunk, hidden_order) for start, end, chunk in plan.chunks]
        return VisionFeatures(
            merged=torch.cat([p.merged for p in parts]),
            deepstack=tuple(torch.cat(tap) for tap in zip(*(p.deepstack for p in parts))),
            hidden=None if hidden_order is None else torch.cat([p.hidden for p in parts]),
        )

    def _embed(self, pixel_values: Tensor, plan: VisionPlan) -> Tensor:
        """[N, embed_dim] patch embedding (+ the resampled position table) in patch order: a new tensor, which the
        blocks may update in place in inference."""
        if self.pos_embed is None:
            return self.patch_embed(pixel_values)
        proj = self.patch_embed.proj
        # The position rows and the conv bias are the GEMM's added term: the whole embedding is one patch_embed
        # GEMM (which also takes the float32 route on CPUs without a native bf16/fp16 GEMM).
        rows = self.ops.interp_pos_embed(
            self.pos_embed.weight, plan.grid_thw, self.config.spatial_merge_size, bias=proj.bias, tokens=plan.tokens
        )  # [N, E]
        return self.ops.patch_embed(pixel_values, proj.weight, rows.to(proj.weight.dtype))

    def _run(self, pixel_values: Tensor, plan: VisionPlan, hidden_order: str | None) -> VisionFeatures:
        units = plan.tokens // (plan.merge_size * plan.merge_size)
        x = self._embed(pixel_values, plan)
        if plan.unit_order is not None:
            x = x.reshape(units, -1)[plan.unit_order].reshape(plan.tokens, -1)
        freqs = self.rope_freqs(x.device)
        training = torch.is_grad_enabled()
        deepstack_mergers = self.deepstack_mergers
        deepstack = []
        for index, (block, windowed) in enumerate(zip(self.blocks, self.windowed)):
            segments = plan.window if windowed else plan.full
            if self.gradient_checkpointing and training:
                x = checkpoint(block, x, plan.positions, freqs, segments, use_reentrant=False)
            else:
                x = block(x, plan.positions, freqs, segments, inplace=not training)
            if index in self.deepstack_at:
                # before the next block, which may update x in place
                deepstack.append(deepstack_mergers[self.deepstack_at[index]](x))
        merged = self.merger(x)
        if plan.unit_restore is not None:
            merged = merged[plan.unit_restore]
            deepstack = [tap[plan.unit_restore] for tap in deepstack]
        hidden = None
        if hidden_order is not None:
            order = {"patch": plan.unit_restore, "window": plan.window_order}[hidden_order]
            hidden = x if order is None else x.reshape(units, -1)[order].reshape(plan.tokens, -1)
        return VisionFeatures(merged=merged, deepstack=tuple(deepstack), hidden=hidden)

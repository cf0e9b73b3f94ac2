"""Drop-in use of vlfuse in HF transformers' Qwen2-VL and Qwen2.5-VL: one call, no change to the model code.

    import vlfuse.patch
    vlfuse.patch.qwen2_vl(model)      # this model's vision tower now runs on vlfuse ops
    vlfuse.patch.qwen2_5_vl()         # every Qwen2.5-VL model (built before or after) runs on vlfuse ops
    vlfuse.patch.revert(model)        # undo the first; vlfuse.patch.revert() undoes the second
    vlfuse.patch.qwen2_vl(model, tower=True)   # the whole tower's forward runs on vlfuse's tower engine

Three pieces of the vision tower are swapped, each for an op computing the same function:
- the patch embedding (``PatchEmbed`` / ``Qwen2_5_VisionPatchEmbed``: view + Conv3d with kernel = stride)
  becomes ``vlfuse.ops.patch_embed`` (one GEMM);
- the rotary application (the module-level ``apply_rotary_pos_emb_vision(q, k, cos, sin)`` that the vision
  attention calls; both transformers 4.57 and 5.x route the rotary through it, with cos/sin computed by the tower in
  4.57 and by its rotary module in 5.x) becomes ``vlfuse.ops.rope_cos_sin``;
- the merger's norm + 2x2 concatenation (``ln_q(x).view(-1, 4 * C)``; LayerNorm in Qwen2-VL, RMSNorm in Qwen2.5-VL)
  becomes ``vlfuse.ops.merge2x2(order="merge")``, followed by HF's own merger MLP.

Only ``forward`` functions are replaced: the modules, their parameters, buffers and hooks stay the very same
objects, so ``state_dict()`` (keys and values), optimizers built beforehand and checkpoints are unaffected. Everything
else (Qwen2.5-VL's window index and its reordering of tokens and cos/sin, the SwiGLU MLPs, attention and its
per-image segments) stays HF's code: the window reordering moves whole 2x2 merge units, so the merger still sees each
window's four tokens adjacent, which is the ``order="merge"`` layout.

With a model, the instances inside it are patched (whatever wraps the vision tower: the ForConditionalGeneration
model, the bare model, or the tower itself). Without one, the transformers classes and the module-level rotary
function are patched, so every model of that family uses vlfuse, including models built afterwards.
"""

from __future__ import annotations

import functools
import importlib
import math
import types
from dataclasses import dataclass

from torch import Tensor, nn

from . import ops

__all__ = ["qwen2_vl", "qwen2_5_vl", "revert"]

_ROTARY_FUNCTION = "apply_rotary_pos_emb_vision"


@dataclass(frozen=True)
class _Family:
    """Where one model family keeps the pieces vlfuse replaces (same names in transformers 4.57 and 5.x)."""

    name: str
    module: str
    patch_embed: str
    attention: str
    merger: str
    norm: str  # the merger's ln_q: "layernorm" or "rmsnorm"
    tower: str  # the whole vision tower, for tower=True
    hidden_order: str  # the order of the tower's last_hidden_state: "patch" or "window" (Qwen2.5-VL's)


_FAMILIES = {
    "qwen2_vl": _Family(
        name="Qwen2-VL",
        module="transformers.models.qwen2_vl.modeling_qwen2_vl",
        patch_embed="PatchEmbed",
        attention="VisionAttention",
        merger="PatchMerger",
        norm="layernorm",
        tower="Qwen2VisionTransformerPretrainedModel",
        hidden_order="patch",
    ),
    "qwen2_5_vl": _Family(
        name="Qwen2.5-VL",
        module="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        patch_embed="Qwen2_5_VisionPatchEmbed",
        attention="Qwen2_5_VLVisionAttention",
        merger="Qwen2_5_VLPatchMerger",
        norm="rmsnorm",
        tower="Qwen2_5_VisionTransformerPretrainedModel",
        hidden_order="window",
    ),
}


# ---- the replacement forwards --------------------------------------------------------------------------------


def _patch_embed_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    # hidden_states: [N, C * Tp * P * P] (any shape with that many elements per patch, as HF's view allows)
    # returns [N, E] in the Conv3d weight's dtype, like HF's PatchEmbed.
    weight = self.proj.weight  # [E, C, Tp, P, P]
    return ops.patch_embed(hidden_states.reshape(-1, weight[0].numel()), weight, self.proj.bias)


def _apply_rotary_pos_emb_vision(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # q: [S, Hq, D], k: [S, Hk, D] (strided views of the qkv projection), cos/sin: [S, D] -> rotated q, k
    return ops.rope_cos_sin(q, k, cos, sin)


def _norm_args(ln_q: nn.Module, norm: str) -> dict:
    if norm == "layernorm":
        return {"bias": ln_q.bias, "eps": ln_q.eps, "norm": "layernorm"}
    return {"bias": None, "eps": ln_q.variance_epsilon, "norm": "rmsnorm"}


def _merger_forward(self: nn.Module, x: Tensor, norm: str) -> Tensor:
    # x: [S, C] tokens in merge order (each m x m window adjacent) -> [S / m^2, out_dim]
    merge_size = math.isqrt(self.hidden_size // x.shape[-1])
    # HF's merger gets no grid: in merge order each window's tokens are adjacent, so none is needed.
    merged = ops.merge2x2(
        x, None, self.ln_q.weight, order="merge", merge_size=merge_size, **_norm_args(self.ln_q, norm)
    )  # [S / m^2, m^2 * C]
    return self.mlp(merged)


def _qwen2_vl_merger_forward(self: nn.Module, x: Tensor) -> Tensor:
    return _merger_forward(self, x, "layernorm")


def _qwen2_5_vl_merger_forward(self: nn.Module, x: Tensor) -> Tensor:
    return _merger_forward(self, x, "rmsnorm")


_MERGER_FORWARDS = {"layernorm": _qwen2_vl_merger_forward, "rmsnorm": _qwen2_5_vl_merger_forward}
_FAMILY_OF_TOWER = {family.tower: family for family in _FAMILIES.values()}

# attention class -> its forward, compiled against module globals in which the rotary function is vlfuse's
_ATTENTION_FORWARDS: dict[type, types.FunctionType] = {}


def _attention_forward(attention_cls: type) -> types.FunctionType:
    """HF's own attention forward, re-bound to globals whose ``apply_rotary_pos_emb_vision`` is vlfuse's.

    This is how one model instance gets the fused rotary while other models keep HF's: the attention code itself
    (attention backends, per-image segments, flash-attention paths) is HF's, whatever the transformers version.
    """
    if attention_cls in _ATTENTION_FORWARDS:
        return _ATTENTION_FORWARDS[attention_cls]
    original = attention_cls.forward
    if _ROTARY_FUNCTION not in original.__code__.co_names:
        raise RuntimeError(
            f"vlfuse.patch: {attention_cls.__qualname__}.forward in this transformers version does not call "
            f"{_ROTARY_FUNCTION}; vlfuse.patch supports transformers 4.57 and 5.x"
        )
    rebound_globals = dict(original.__globals__)
    rebound_globals[_ROTARY_FUNCTION] = _apply_rotary_pos_emb_vision
    forward = types.FunctionType(
        original.__code__, rebound_globals, original.__name__, original.__defaults__, original.__closure__
    )
    forward.__kwdefaults__ = original.__kwdefaults__
    functools.update_wrapper(forward, original)
    _ATTENTION_FORWARDS[attention_cls] = forward
    return forward


_TOWER_ATTRIBUTE = "_vlfuse_tower"


def _tower_forward(self: nn.Module, hidden_states: Tensor, grid_thw: Tensor, **kwargs):
    """HF's vision tower forward, run by vlfuse's tower on the very same Parameter objects (built on first use).

    hidden_states: [N, C * Tp * P * P] patches, grid_thw [items, 3] (read to the host once per call). Returns what
    HF's tower returns: the merged tokens [N / m^2, out] (transformers 4.x), or an output with ``pooler_output``
    (those) and ``last_hidden_state`` [N, width] in HF's order (transformers 5.x). HF's precomputed-metadata
    kwargs (position_ids, cu_seqlens, window_index, ...) are not needed and are ignored."""
    tower = self.__dict__.get(_TOWER_ATTRIBUTE)
    if tower is None:
        from .models.vision_tower import VisionTower

        tower = VisionTower.from_hf(self, share_parameters=True)
        tower.gradient_checkpointing = getattr(self, "gradient_checkpointing", False)
        self.__dict__[_TOWER_ATTRIBUTE] = tower  # not a submodule: the state dict stays HF's
    family = _FAMILY_OF_TOWER[type(self).__name__]
    hidden, merged = tower.features(hidden_states.reshape(-1, tower.config.patch_dim), grid_thw,
                                    hidden_order=family.hidden_order)
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return merged
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)


# ---- bookkeeping ---------------------------------------------------------------------------------------------

# (owner object, attribute) -> the original value, for everything patched at class/module level
_CLASS_PATCHES: dict[tuple[object, str], object] = {}


def _load(family: _Family) -> types.ModuleType:
    try:
        module = importlib.import_module(family.module)
    except ImportError as exc:
        raise ImportError(
            f"vlfuse.patch: patching {family.name} needs HF transformers (4.57 or 5.x), which could not be imported "
            f"({exc}); install it with `pip install transformers`"
        ) from exc
    names = (family.patch_embed, family.attention, family.merger, family.tower, _ROTARY_FUNCTION)
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        import transformers

        raise RuntimeError(
            f"vlfuse.patch: {family.module} of transformers {transformers.__version__} has no {', '.join(missing)}; "
            "vlfuse.patch supports transformers 4.57 and 5.x"
        )
    return module


def _set_class_attr(owner: object, name: str, value: object) -> None:
    _CLASS_PATCHES.setdefault((owner, name), getattr(owner, name))
    setattr(owner, name, value)


def _set_forward(module: nn.Module, forward: types.FunctionType) -> None:
    # An instance attribute shadows the class's forward; nn.Module.__call__ (and its hooks) run it unchanged.
    module.forward = types.MethodType(forward, module)


def _is_vlfuse_forward(module: nn.Module) -> bool:
    bound = module.__dict__.get("forward")
    ours = {_patch_embed_forward, _tower_forward, *_MERGER_FORWARDS.values(), *_ATTENTION_FORWARDS.values()}
    return isinstance(bound, types.MethodType) and bound.__func__ in ours


def _patch(
    key: str, model: nn.Module | None, patch_embed: bool, rotary: bool, merger: bool, tower: bool
) -> nn.Module | None:
    family = _FAMILIES[key]
    module = _load(family)
    embed_cls, attention_cls, merger_cls, tower_cls = (
        getattr(module, family.patch_embed),
        getattr(module, family.attention),
        getattr(module, family.merger),
        getattr(module, family.tower),
    )
    merger_forward = _MERGER_FORWARDS[family.norm]
    if model is None:
        if tower:
            _set_class_attr(tower_cls, "forward", _tower_forward)
        if patch_embed:
            _set_class_attr(embed_cls, "forward", _patch_embed_forward)
        if rotary:
            _set_class_attr(module, _ROTARY_FUNCTION, _apply_rotary_pos_emb_vision)
        if merger:
            _set_class_attr(merger_cls, "forward", merger_forward)
        return None

    found = False
    for sub in model.modules():
        if isinstance(sub, tower_cls):
            found = True
            if tower:
                _set_forward(sub, _tower_forward)
        elif isinstance(sub, embed_cls):
            found = True
            if patch_embed:
                _set_forward(sub, _patch_embed_forward)
        elif isinstance(sub, attention_cls):
            found = True
            if rotary:
                _set_forward(sub, _attention_forward(attention_cls))
        elif isinstance(sub, merger_cls):
            found = True
            if merger:
                _set_forward(sub, merger_forward)
    if not found:
        raise ValueError(
            f"vlfuse.patch: {type(model).__name__} contains no {family.name} vision module "
            f"({family.patch_embed}, {family.attention}, {family.merger})"
        )
    return model


# ---- public API ------------------------------------------------------------------------------------------------


def qwen2_vl(
    model: nn.Module | None = None,
    *,
    patch_embed: bool = True,
    rotary: bool = True,
    merger: bool = True,
    tower: bool = False,
) -> nn.Module | None:
    """Runs HF transformers' Qwen2-VL vision tower on vlfuse ops.

    model: a Qwen2VLForConditionalGeneration, Qwen2VLModel or the vision tower itself: its modules are patched in
    place and it is returned. None: the transformers classes are patched, for every Qwen2-VL model.
    patch_embed / rotary / merger: which pieces to swap (all by default). Weights are not touched.
    tower: also route the whole vision tower's forward through vlfuse's tower (``vlfuse.models.VisionTower``) on
    the same Parameter objects: a plan computed once per call, attention batched by segment length with no
    S x S mask, no per-layer host reads. HF's forward hooks inside the tower (output_attentions, per-block
    hidden states) are then not called.
    """
    return _patch("qwen2_vl", model, patch_embed, rotary, merger, tower)


def qwen2_5_vl(
    model: nn.Module | None = None,
    *,
    patch_embed: bool = True,
    rotary: bool = True,
    merger: bool = True,
    tower: bool = False,
) -> nn.Module | None:
    """Runs HF transformers' Qwen2.5-VL vision tower on vlfuse ops (its merger's RMSNorm included).

    Arguments as in :func:`qwen2_vl`. Window attention, its token reordering and the SwiGLU MLPs stay HF's.
    """
    return _patch("qwen2_5_vl", model, patch_embed, rotary, merger, tower)


def revert(model: nn.Module | None = None) -> nn.Module | None:
    """Undoes the patches: with a model, those applied to its modules; without, those applied to the classes and
    module functions of transformers (both families). Returns the model."""
    if model is None:
        for (owner, name), original in _CLASS_PATCHES.items():
            setattr(owner, name, original)
        _CLASS_PATCHES.clear()
        return None
    for sub in model.modules():
        if _is_vlfuse_forward(sub):
            del sub.forward
        sub.__dict__.pop(_TOWER_ATTRIBUTE, None)
    return model

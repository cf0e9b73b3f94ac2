"""Drop-in use of vlfuse in HF transformers' Qwen vision towers: one call, no change to the model code.

Eight families: Qwen2-VL, Qwen2.5-VL and the Qwen3 generation (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE,
Qwen3-Omni-MoE's vision encoder, Qwen4-Exp)::

    import vlfuse.patch
    vlfuse.patch.qwen2_vl(model)      # this model's vision tower now runs on vlfuse ops
    vlfuse.patch.qwen2_5_vl()         # every Qwen2.5-VL model (built before or after) runs on vlfuse ops
    vlfuse.patch.auto(model)          # whichever supported vision towers the model holds
    vlfuse.patch.revert(model)        # undo the first; vlfuse.patch.revert() undoes the second
    vlfuse.patch.qwen3_vl(model, tower=True)   # the whole tower's forward runs on vlfuse's tower engine

Three pieces of the vision tower are swapped, each for an op computing the same function:
- the patch embedding (``PatchEmbed`` / ``Qwen2_5_VisionPatchEmbed`` / ``Qwen3VLVisionPatchEmbed`` ...: view +
  Conv3d with kernel = stride) becomes ``vlfuse.ops.patch_embed`` (one GEMM);
- the rotary application (the module-level ``apply_rotary_pos_emb_vision(q, k, cos, sin)`` that the vision
  attention calls; both transformers 4.57 and 5.x route the rotary through it, with cos/sin computed by the tower in
  4.57 and by its rotary module in 5.x) becomes ``vlfuse.ops.rope_cos_sin``;
- the merger's norm + 2x2 concatenation (``ln_q(x).view(-1, 4 * C)``; LayerNorm in Qwen2-VL and the Qwen3
  generation, RMSNorm in Qwen2.5-VL; the Qwen3 deepstack mergers' ``norm(x.view(-1, 4 * C))``) becomes
  ``vlfuse.ops.merge2x2(order="merge")``, followed by HF's own merger MLP.
The Qwen3 generation's position-table resampling is part of the tower's own forward: ``tower=True`` runs it on
``vlfuse.ops.interp_pos_embed``, folded with the patch embedding into one GEMM.

Only ``forward`` functions are replaced: the modules, their parameters, buffers and hooks stay the very same
objects, so ``state_dict()`` (keys and values), optimizers built beforehand and checkpoints are unaffected. Everything
else (Qwen2.5-VL's window index and its reordering of tokens and cos/sin, the MLPs, attention and its per-image
segments) stays HF's code: the window reordering moves whole 2x2 merge units, so the merger still sees each
window's four tokens adjacent, which is the ``order="merge"`` layout.

With a model, the instances inside it are patched (whatever wraps the vision tower: the ForConditionalGeneration
model, the bare model, or the tower itself). Without one, the transformers classes and the module-level rotary
function are patched, so every model of that family uses vlfuse, including models built afterwards.

backend: "vlfuse" (the ops) or "eager" (the same pieces through vlfuse's plain torch references; see
``vlfuse.nn.backends``): a parity aid.
"""

from __future__ import annotations

import functools
import importlib
import math
import types
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from .nn import backends

__all__ = [
    "auto",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_omni_moe",
    "qwen4_exp",
    "revert",
]

_ROTARY_FUNCTION = "apply_rotary_pos_emb_vision"


@dataclass(frozen=True)
class _Family:
    """Where one model family keeps the pieces vlfuse replaces (same names in transformers 4.57 and 5.x)."""

    name: str
    module: str
    patch_embed: str
    attention: str
    merger: str
    # which merger forward replaces HF's: "layernorm" (ln_q LayerNorm, mlp Sequential: Qwen2-VL), "rmsnorm"
    # (Qwen2.5-VL), "qwen3" (norm, linear_fc1 / act_fn / linear_fc2) or "qwen3_omni" (ln_q, mlp ModuleList)
    merger_kind: str
    tower: str  # the whole vision tower, for tower=True
    hidden_order: str  # the order of the tower's last_hidden_state: "patch" or "window" (Qwen2.5-VL's)
    output: str = "BaseModelOutputWithPooling"  # the tower's output class (in transformers 5.x)


def _qwen3_family(name: str, key: str, prefix: str, tower: str = "VisionModel", **changes) -> _Family:
    """The Qwen3 generation names every piece ``<prefix>Vision<piece>``."""
    fields = dict(
        name=name,
        module=f"transformers.models.{key}.modeling_{key}",
        patch_embed=f"{prefix}VisionPatchEmbed",
        attention=f"{prefix}VisionAttention",
        merger=f"{prefix}VisionPatchMerger",
        merger_kind="qwen3",
        tower=f"{prefix}{tower}",
        hidden_order="patch",
    )
    return _Family(**{**fields, **changes})


_DEEPSTACK = "BaseModelOutputWithDeepstackFeatures"

_FAMILIES = {
    "qwen2_vl": _Family(
        name="Qwen2-VL",
        module="transformers.models.qwen2_vl.modeling_qwen2_vl",
        patch_embed="PatchEmbed",
        attention="VisionAttention",
        merger="PatchMerger",
        merger_kind="layernorm",
        tower="Qwen2VisionTransformerPretrainedModel",
        hidden_order="patch",
    ),
    "qwen2_5_vl": _Family(
        name="Qwen2.5-VL",
        module="transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
        patch_embed="Qwen2_5_VisionPatchEmbed",
        attention="Qwen2_5_VLVisionAttention",
        merger="Qwen2_5_VLPatchMerger",
        merger_kind="rmsnorm",
        tower="Qwen2_5_VisionTransformerPretrainedModel",
        hidden_order="window",
    ),
    "qwen3_vl": _qwen3_family("Qwen3-VL", "qwen3_vl", "Qwen3VL", output=_DEEPSTACK),
    "qwen3_vl_moe": _qwen3_family("Qwen3-VL-MoE", "qwen3_vl_moe", "Qwen3VLMoe", output=_DEEPSTACK),
    "qwen3_5": _qwen3_family("Qwen3.5", "qwen3_5", "Qwen3_5"),
    "qwen3_5_moe": _qwen3_family("Qwen3.5-MoE", "qwen3_5_moe", "Qwen3_5Moe"),
    "qwen3_omni_moe": _qwen3_family(
        "Qwen3-Omni-MoE", "qwen3_omni_moe", "Qwen3OmniMoe", tower="VisionEncoder", merger_kind="qwen3_omni",
        output=_DEEPSTACK,
    ),  # fmt: skip
    "qwen4_exp": _qwen3_family("Qwen4-Exp", "qwen4_exp", "Qwen4Exp"),
}


# ---- the replacement forwards --------------------------------------------------------------------------------

_BACKEND_ATTRIBUTE = "_vlfuse_backend"


def _ops(module: nn.Module) -> backends.Backend:
    # set on the instance (instance patches) or on its class (class patches)
    return backends.get(getattr(module, _BACKEND_ATTRIBUTE, "vlfuse"))


def _patch_embed_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    # hidden_states: [N, C * Tp * P * P] (any shape with that many elements per patch, as HF's view allows)
    # returns [N, E] in the Conv3d weight's dtype, like HF's PatchEmbed.
    weight = self.proj.weight  # [E, C, Tp, P, P]
    return _ops(self).patch_embed(hidden_states.reshape(-1, weight[0].numel()), weight, self.proj.bias)


@functools.cache
def _rotary_function(backend: str) -> Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]:
    ops = backends.get(backend)

    def apply_rotary_pos_emb_vision(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        # q: [S, Hq, D], k: [S, Hk, D] (strided views of the qkv projection), cos/sin: [S, D] -> rotated q, k
        return ops.rope_cos_sin(q, k, cos, sin)

    return apply_rotary_pos_emb_vision


def _norm_args(norm_module: nn.Module, norm: str) -> dict:
    if norm == "layernorm":
        return {"bias": norm_module.bias, "eps": norm_module.eps, "norm": "layernorm"}
    return {"bias": None, "eps": norm_module.variance_epsilon, "norm": "rmsnorm"}


def _merge(self: nn.Module, x: Tensor, norm_module: nn.Module, norm: str) -> Tensor:
    # x: [S, C] tokens in merge order (each m x m window adjacent) -> [S / m^2, m^2 * C] normalized. HF's merger gets
    # no grid: in merge order each window's tokens are adjacent, so none is needed.
    merge_size = math.isqrt(self.hidden_size // x.shape[-1])
    # the Qwen3 deepstack mergers normalize the concatenated row; postshuffle_norm goes to the op only for them
    postshuffle = {"postshuffle_norm": True} if getattr(self, "use_postshuffle_norm", False) else {}
    return _ops(self).merge2x2(
        x, None, norm_module.weight, order="merge", merge_size=merge_size, **_norm_args(norm_module, norm),
        **postshuffle,
    )  # fmt: skip


def _qwen2_vl_merger_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.mlp(_merge(self, x, self.ln_q, "layernorm"))


def _qwen2_5_vl_merger_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.mlp(_merge(self, x, self.ln_q, "rmsnorm"))


def _qwen3_merger_forward(self: nn.Module, x: Tensor) -> Tensor:
    return self.linear_fc2(self.act_fn(self.linear_fc1(_merge(self, x, self.norm, "layernorm"))))


def _qwen3_omni_merger_forward(self: nn.Module, x: Tensor) -> Tensor:
    x = _merge(self, x, self.ln_q, "layernorm")
    for layer in self.mlp:  # a ModuleList: Linear, GELU, Linear
        x = layer(x)
    return x


_MERGER_FORWARDS = {
    "layernorm": _qwen2_vl_merger_forward,
    "rmsnorm": _qwen2_5_vl_merger_forward,
    "qwen3": _qwen3_merger_forward,
    "qwen3_omni": _qwen3_omni_merger_forward,
}

# (attention class, backend) -> its forward, compiled against module globals in which the rotary function is vlfuse's
_ATTENTION_FORWARDS: dict[tuple[type, str], types.FunctionType] = {}


def _attention_forward(attention_cls: type, backend: str) -> types.FunctionType:
    """HF's own attention forward, re-bound to globals whose ``apply_rotary_pos_emb_vision`` is vlfuse's.

    This is how one model instance gets the fused rotary while other models keep HF's: the attention code itself
    (attention backends, per-image segments, flash-attention paths) is HF's, whatever the transformers version.
    """
    if (attention_cls, backend) in _ATTENTION_FORWARDS:
        return _ATTENTION_FORWARDS[attention_cls, backend]
    original = attention_cls.forward
    if _ROTARY_FUNCTION not in original.__code__.co_names:
        raise RuntimeError(
            f"vlfuse.patch: {attention_cls.__qualname__}.forward in this transformers version does not call "
            f"{_ROTARY_FUNCTION}; vlfuse.patch supports transformers 4.57 and 5.x"
        )
    rebound_globals = dict(original.__globals__)
    rebound_globals[_ROTARY_FUNCTION] = _rotary_function(backend)
    forward = types.FunctionType(
        original.__code__, rebound_globals, original.__name__, original.__defaults__, original.__closure__
    )
    forward.__kwdefaults__ = original.__kwdefaults__
    functools.update_wrapper(forward, original)
    _ATTENTION_FORWARDS[attention_cls, backend] = forward
    return forward


_TOWER_ATTRIBUTE = "_vlfuse_tower"


def _tower_forward(self: nn.Module, hidden_states: Tensor, grid_thw: Tensor, **kwargs):
    """HF's vision tower forward, run by vlfuse's tower on the very same Parameter objects (built on first use).

    hidden_states: [N, C * Tp * P * P] patches, grid_thw [items, 3] (read to the host once per call). Returns what
    HF's tower returns: the merged tokens [N / m^2, out] (transformers 4.x; the Qwen3 towers with deepstack mergers:
    (those, the list of deepstack features)), or an output with ``pooler_output``
    (those), ``last_hidden_state`` [N, width] in HF's order and, for the Qwen3 towers with deepstack mergers,
    ``deepstack_features`` (a list of [N / m^2, out]) (transformers 5.x). HF's precomputed-metadata kwargs
    (position_ids, cu_seqlens, window_index, interp_indices, ...) are not needed and are ignored."""
    tower = self.__dict__.get(_TOWER_ATTRIBUTE)
    if tower is None:
        from .models.vision_tower import VisionTower

        tower = VisionTower.from_hf(self, backend=_ops(self).name, share_parameters=True)
        tower.gradient_checkpointing = getattr(self, "gradient_checkpointing", False)
        self.__dict__[_TOWER_ATTRIBUTE] = tower  # not a submodule: the state dict stays HF's
    family = _FAMILIES[_family_key(type(self))]
    features = tower.features(
        hidden_states.reshape(-1, tower.config.patch_dim), grid_thw, hidden_order=family.hidden_order
    )
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return (features.merged, list(features.deepstack)) if family.output == _DEEPSTACK else features.merged
    output = getattr(importlib.import_module(family.module), family.output)
    fields = dict(last_hidden_state=features.hidden, pooler_output=features.merged)
    if family.output == _DEEPSTACK:
        fields["deepstack_features"] = list(features.deepstack)
    return output(**fields)


# ---- bookkeeping ---------------------------------------------------------------------------------------------

# (module or class name, class name) of every class vlfuse patches -> its family
_CLASS_FAMILY = {
    (family.module, name): key
    for key, family in _FAMILIES.items()
    for name in (family.tower, family.patch_embed, family.attention, family.merger)
}


def _family_key(cls: type) -> str | None:
    """The family of an HF vision class or of a subclass of one (matched by module and name: no import)."""
    for klass in cls.__mro__:
        key = _CLASS_FAMILY.get((klass.__module__, klass.__name__))
        if key is not None:
            return key
    return None


# (owner object, attribute) -> the original value (_MISSING: none of its own), for everything patched at
# class/module level
_CLASS_PATCHES: dict[tuple[object, str], object] = {}
_MISSING = object()


def _load(family: _Family) -> types.ModuleType:
    try:
        module = importlib.import_module(family.module)
    except ImportError as exc:
        raise ImportError(
            f"vlfuse.patch: patching {family.name} needs HF transformers (4.57 or 5.x; 5.x for the Qwen3 generation), "
            f"which could not be imported ({exc}); install it with `pip install transformers`"
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
    _CLASS_PATCHES.setdefault((owner, name), vars(owner).get(name, _MISSING))
    setattr(owner, name, value)


def _set_forward(module: nn.Module, forward: types.FunctionType, backend: str) -> None:
    # An instance attribute shadows the class's forward; nn.Module.__call__ (and its hooks) run it unchanged.
    module.forward = types.MethodType(forward, module)
    module.__dict__[_BACKEND_ATTRIBUTE] = backend


def _is_vlfuse_forward(module: nn.Module) -> bool:
    bound = module.__dict__.get("forward")
    ours = {_patch_embed_forward, _tower_forward, *_MERGER_FORWARDS.values(), *_ATTENTION_FORWARDS.values()}
    return isinstance(bound, types.MethodType) and bound.__func__ in ours


def _patch(
    key: str, model: nn.Module | None, patch_embed: bool, rotary: bool, merger: bool, tower: bool, backend: str
) -> nn.Module | None:
    family = _FAMILIES[key]
    backends.get(backend)  # a clear error for an unknown backend before anything is patched
    module = _load(family)
    embed_cls, attention_cls, merger_cls, tower_cls = (
        getattr(module, family.patch_embed),
        getattr(module, family.attention),
        getattr(module, family.merger),
        getattr(module, family.tower),
    )
    merger_forward = _MERGER_FORWARDS[family.merger_kind]
    if model is None:
        patched = [(tower_cls, tower), (embed_cls, patch_embed), (merger_cls, merger)]
        for cls, chosen in patched:
            if chosen:
                _set_class_attr(cls, _BACKEND_ATTRIBUTE, backend)
        if tower:
            _set_class_attr(tower_cls, "forward", _tower_forward)
        if patch_embed:
            _set_class_attr(embed_cls, "forward", _patch_embed_forward)
        if rotary:
            _set_class_attr(module, _ROTARY_FUNCTION, _rotary_function(backend))
        if merger:
            _set_class_attr(merger_cls, "forward", merger_forward)
        return None

    found = False
    for sub in model.modules():
        if isinstance(sub, tower_cls):
            found = True
            if tower:
                _set_forward(sub, _tower_forward, backend)
        elif isinstance(sub, embed_cls):
            found = True
            if patch_embed:
                _set_forward(sub, _patch_embed_forward, backend)
        elif isinstance(sub, attention_cls):
            found = True
            if rotary:
                _set_forward(sub, _attention_forward(attention_cls, backend), backend)
        elif isinstance(sub, merger_cls):
            found = True
            if merger:
                _set_forward(sub, merger_forward, backend)
    if not found:
        raise ValueError(
            f"vlfuse.patch: {type(model).__name__} contains no {family.name} vision module "
            f"({family.tower}, {family.patch_embed}, {family.attention}, {family.merger})"
        )
    return model


# ---- public API ------------------------------------------------------------------------------------------------

_ARGUMENTS = """
    model: a ForConditionalGeneration model, the bare model, or the vision tower itself ({tower}): its modules are
    patched in place and it is returned. None: the transformers classes are patched, for every {name} model.
    patch_embed / rotary / merger: which pieces to swap (all by default). Weights are not touched.
    tower: also route the whole vision tower's forward through vlfuse's tower (``vlfuse.models.VisionTower``) on
    the same Parameter objects: a plan computed once per call, attention batched by segment length with no
    S x S mask, no per-layer host reads. HF's forward hooks inside the tower (output_attentions, per-block
    hidden states) are then not called.
    backend: "vlfuse" (the ops) or "eager" (vlfuse's plain torch references of the same functions).
"""

_NOTES = {
    "qwen2_vl": "",
    "qwen2_5_vl": " (its merger's RMSNorm included; window attention, its token reordering and the SwiGLU MLPs "
    "stay HF's)",
    "qwen3_vl": " (the deepstack mergers included; tower=True also returns the deepstack features)",
    "qwen3_vl_moe": " (the deepstack mergers included; tower=True also returns the deepstack features)",
    "qwen3_5": "",
    "qwen3_5_moe": "",
    "qwen3_omni_moe": " (the thinker's vision encoder, its deepstack mergers included)",
    "qwen4_exp": "",
}


def _entry(key: str) -> Callable[..., nn.Module | None]:
    family = _FAMILIES[key]

    def patch(
        model: nn.Module | None = None,
        *,
        patch_embed: bool = True,
        rotary: bool = True,
        merger: bool = True,
        tower: bool = False,
        backend: str = "vlfuse",
    ) -> nn.Module | None:
        return _patch(key, model, patch_embed, rotary, merger, tower, backend)

    patch.__name__ = patch.__qualname__ = key
    patch.__module__ = __name__
    summary = f"Runs HF transformers' {family.name} vision tower on vlfuse ops{_NOTES[key]}.\n"
    patch.__doc__ = summary + _ARGUMENTS.format(tower=family.tower, name=family.name)
    return patch


qwen2_vl = _entry("qwen2_vl")
qwen2_5_vl = _entry("qwen2_5_vl")
qwen3_vl = _entry("qwen3_vl")
qwen3_vl_moe = _entry("qwen3_vl_moe")
qwen3_5 = _entry("qwen3_5")
qwen3_5_moe = _entry("qwen3_5_moe")
qwen3_omni_moe = _entry("qwen3_omni_moe")
qwen4_exp = _entry("qwen4_exp")


def auto(
    model: nn.Module,
    *,
    patch_embed: bool = True,
    rotary: bool = True,
    merger: bool = True,
    tower: bool = False,
    backend: str = "vlfuse",
) -> nn.Module:
    """Patches every supported vision module in model (a whole model, a bare vision tower, or anything holding
    them), whichever of the eight families it belongs to; arguments as in :func:`qwen2_vl`. Returns the model.
    A model holding none raises a ValueError naming the classes looked for."""
    keys = sorted({key for sub in model.modules() if (key := _family_key(type(sub))) is not None})
    if not keys:
        looked_for = "; ".join(
            f"{f.name}: {f.tower}, {f.patch_embed}, {f.attention}, {f.merger}" for f in _FAMILIES.values()
        )
        raise ValueError(
            f"vlfuse.patch.auto: {type(model).__name__} contains no supported vision module (looked for {looked_for})"
        )
    for key in keys:
        _patch(key, model, patch_embed, rotary, merger, tower, backend)
    return model


def revert(model: nn.Module | None = None) -> nn.Module | None:
    """Undoes the patches: with a model, those applied to its modules; without, those applied to the classes and
    module functions of transformers (every family). Returns the model."""
    if model is None:
        for (owner, name), original in _CLASS_PATCHES.items():
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        _CLASS_PATCHES.clear()
        return None
    for sub in model.modules():
        if _is_vlfuse_forward(sub):
            del sub.forward
        sub.__dict__.pop(_TOWER_ATTRIBUTE, None)
        sub.__dict__.pop(_BACKEND_ATTRIBUTE, None)
    return model

"""Loads the compiled library. A missing or broken build warns instead of failing the import, so the eager
references (and everything built on them, e.g. ``backend="eager"``) keep working; calling an op then raises."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.autograd import forward_ad

NATIVE_ERROR: str | None = None
try:
    from . import _C as native
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    native = None
    NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"vlfuse: the native library could not be loaded ({NATIVE_ERROR}); vlfuse ops are unavailable. "
        "Rebuild with `pip install --no-build-isolation .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )


def require_native() -> None:
    if native is None:
        raise RuntimeError(f"vlfuse: the native library is not loaded ({NATIVE_ERROR}); rebuild vlfuse")


# op -> (the autograd.Function that call_op records it with in eager mode, the one it records it with under
# torch.func transforms, see register_autograd; the schema's default values, which fill in trailing arguments a
# call leaves out, as the dispatcher does)
_Function = type[torch.autograd.Function]
_EAGER_AUTOGRAD: dict[torch._ops.OpOverload, tuple[_Function, _Function, list]] = {}


def register_autograd(op: torch._ops.OpOverload, backward: Callable, setup_context: Callable) -> None:
    """Registers an op's backward with torch.library.register_autograd (what torch.ops callers, torch.compile and
    opcheck go through) and builds from the same two functions the autograd.Functions that call_op records eager
    calls with. torch's generated Function re-dispatches in Python and rebuilds the argument list from the schema
    on every call, a cost comparable to a small op's own run time.

    Two Functions: a one-piece forward (ctx first) for plain eager calls, and for calls under torch.func
    transforms (grad, vjp, jacrev, vmap of those), which accept only a forward without ctx plus a separate
    setup_context, the same pieces in that form; it also lets vmap batch forward and backward by running them
    per sample (generate_vmap_rule), as it runs the ops themselves. The first form skips the binding of
    arguments to forward's signature that torch does on every call of the second."""
    torch.library.register_autograd(op._name, backward, setup_context=setup_context)

    def jvp(ctx, *tangents):
        raise RuntimeError(
            f"vlfuse: {op._namespace}::{op._opname} has no forward-mode derivative (torch.func.jvp / jacfwd, "
            "torch.autograd.forward_ad); use reverse mode (backward, torch.func.grad / vjp / jacrev)"
        )

    def forward_below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def forward(ctx, *args):
        output = forward_below_autograd(*args)
        setup_context(ctx, args, output)
        return output

    name = f"{op._namespace}_{op._opname}_Function"
    function = type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward), "jvp": staticmethod(jvp)},
    )
    transformable = type(
        f"{name}_Transformable",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward_below_autograd),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "generate_vmap_rule": True,
        },
    )
    _EAGER_AUTOGRAD[op] = (function, transformable, [argument.default_value for argument in op._schema.arguments])


def call_op(op: torch._ops.OpOverload, *args):
    """Calls a vlfuse op. When autograd has nothing to record (grad mode off, or no argument requires grad) the
    call goes straight below the Autograd key: the kernel torch.library.register_autograd puts there is Python,
    and its no-grad branch, which only re-dispatches, costs as much as the whole op on a small input. A call to
    record is recorded by
    the op's eager Function (register_autograd), except under autocast: the dispatcher runs an op's autocast
    rule before its Autograd kernel, so autograd records the casts, while the Function would record the uncast
    call and cast inside it. Inside a torch.compile trace the op is called as it is, for the graph to record it.
    Under torch.func transforms, or with a forward-AD level open, the call goes through the Function too, even
    with nothing to record: below autograd, forward-mode tangents would be dropped without a word, where the
    Function's jvp says that the op has none."""
    require_native()
    if torch.compiler.is_compiling():
        return op(*args)
    transforms = torch._C._are_functorch_transforms_active()
    record = torch.is_grad_enabled() and torch._C._any_requires_grad(*args)
    if record or transforms or forward_ad._current_level >= 0:
        recorded = _EAGER_AUTOGRAD.get(op)
        if recorded is None or torch._C._is_any_autocast_enabled():
            return op(*args)
        function, transformable, defaults = recorded
        return (transformable if transforms else function).apply(*args, *defaults[len(args) :])
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)

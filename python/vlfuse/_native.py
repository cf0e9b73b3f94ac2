"""Loads the compiled library, and records vlfuse ops for autograd.

A missing or broken build warns instead of failing the import, so the eager references (and everything built on
them, e.g. ``backend="eager"``) keep working; calling an op then raises.

Every op is recorded for autograd one way, through ``register_autograd`` (its backward and setup_context) and
``call_op`` (every call of the op). The recording has two modes, chosen by one switch:

- eager autograd on (the default): ``call_op`` skips the autograd layer when there is nothing to record and
  records eager calls with the op's own autograd.Function, which saves torch's generic per-call overhead. This
  needs private torch APIs; they are all in the section "private torch APIs" below, used only on the torch
  versions in ``TESTED_TORCH``.
- eager autograd off (``VLFUSE_EAGER_AUTOGRAD=0`` in the environment, read once at import, or
  ``set_eager_autograd(False)``): ``call_op`` is a plain ``torch.ops`` call, recorded by the autograd kernel that
  torch.library.register_autograd registers, as for any ``torch.ops`` caller. Values and gradients are the same;
  only the per-call overhead and torch.func differ:

  ==========================================  ===================================  =================================
  transform                                   eager mode                           plain mode
  ==========================================  ===================================  =================================
  torch.func grad, vjp, jacrev, vmap of grad  autograd's gradients                 RuntimeError: torch.library's
                                                                                   generated Function has no
                                                                                   setup_context (pytorch#179652)
  torch.func.vmap (no grad)                   runs the op per sample               the same
  forward mode (torch.func.jvp / jacfwd,      RuntimeError naming the op (it has   tangents dropped without a word:
  torch.autograd.forward_ad)                  no forward-mode derivative)          zero (torch.func) or None
  ==========================================  ===================================  =================================

An op that writes into its arguments (``rope_``) cannot have its autograd registered with torch.library, which
takes only functional ops; its Function (public API only) records it in both modes. Being one piece (ctx first),
it raises under torch.func's reverse transforms in both.

A public function that returns a view of its input besides an op's outputs (``rope_qkv``'s v, as HF's own split
hands it out) records itself with a Function of its own, in both modes, when ``must_record`` says so: no op may
return a view of its input, and recording the op and the view apart would leave the gradient of the input to be
summed from two full-size pieces. That Function is in the form torch.func accepts, so it works under the
transforms in both modes, and its jvp raises as the eager Functions' do.
"""

from __future__ import annotations

import os
import re
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


# ---- private torch APIs ------------------------------------------------------------------------------------------
# The eager mode's only dependencies outside torch's public API. Each was checked on every torch version in
# TESTED_TORCH (major, minor; both ends included). On any other version, or when one of them is missing, eager
# autograd stays off, with one warning, and every op is recorded by torch.library's autograd kernel.
#   torch._C._AutoDispatchBelowAutograd    run an op below the Autograd key (no recording, no generic re-dispatch)
#   torch._C._any_requires_grad            whether any argument requires grad, without a Python loop
#   torch._C._are_functorch_transforms_active   whether a torch.func transform is running
#   torch._C._is_any_autocast_enabled      whether autocast is on for any device
#   torch.autograd.forward_ad._current_level    the open forward-AD level (-1 when none)
TESTED_TORCH = ((2, 11), (2, 14))
_PRIVATE_C_APIS = (
    "_AutoDispatchBelowAutograd",
    "_any_requires_grad",
    "_are_functorch_transforms_active",
    "_is_any_autocast_enabled",
)


def private_api_problem(version: str = torch.__version__) -> str | None:
    """Why eager autograd cannot run on this torch (a sentence), or None when it can."""
    match = re.match(r"(\d+)\.(\d+)", version)
    (low_major, low_minor), (high_major, high_minor) = TESTED_TORCH
    tested = f"{low_major}.{low_minor} to {high_major}.{high_minor}"
    if match is None or not TESTED_TORCH[0] <= (int(match[1]), int(match[2])) <= TESTED_TORCH[1]:
        return f"it was tested on torch {tested}, and this is torch {version}"
    missing = [f"torch._C.{name}" for name in _PRIVATE_C_APIS if not hasattr(torch._C, name)]
    if not hasattr(forward_ad, "_current_level"):
        missing.append("torch.autograd.forward_ad._current_level")
    if missing:
        return f"this torch {version} lacks {', '.join(missing)}"
    return None


def _forward_ad_open() -> bool:
    return forward_ad._current_level >= 0


if private_api_problem() is None:
    _below_autograd = torch._C._AutoDispatchBelowAutograd
    _any_requires_grad = torch._C._any_requires_grad
    _transforms_active = torch._C._are_functorch_transforms_active
    _autocast_enabled = torch._C._is_any_autocast_enabled


# ---- the switch ---------------------------------------------------------------------------------------------------

EAGER_AUTOGRAD_VARIABLE = "VLFUSE_EAGER_AUTOGRAD"
_eager_autograd = False
_warned = False


def set_eager_autograd(enabled: bool) -> bool:
    """Turns eager autograd recording on or off for every later call (the process-wide form of
    VLFUSE_EAGER_AUTOGRAD, for tests that compare the two). Returns the previous setting. Turning it on where the
    private APIs it needs are not known to work (see private_api_problem) warns once and leaves it off."""
    global _eager_autograd, _warned
    previous = _eager_autograd
    problem = private_api_problem() if enabled else None
    if problem is not None and not _warned:
        _warned = True
        warnings.warn(
            f"vlfuse: eager autograd recording is off because {problem}; vlfuse ops are recorded by "
            f"torch.library's autograd kernel instead (same gradients; set {EAGER_AUTOGRAD_VARIABLE}=0 to say so "
            "and silence this warning)",
            RuntimeWarning,
            stacklevel=2,
        )
    _eager_autograd = enabled and problem is None
    return previous


def eager_autograd_enabled() -> bool:
    return _eager_autograd


set_eager_autograd(os.environ.get(EAGER_AUTOGRAD_VARIABLE, "1").strip().lower() not in ("0", "false", "off", "no"))


# ---- registration and calls ---------------------------------------------------------------------------------------

_Function = type[torch.autograd.Function]
# functional op -> (the autograd.Function call_op records its eager calls with, the one it records them with
# under torch.func transforms); used only in eager mode
_EAGER_AUTOGRAD: dict[torch._ops.OpOverload, tuple[_Function, _Function]] = {}
# op writing into its arguments -> (its autograd.Function, the positions of the arguments it writes); both modes
_MUTATING: dict[torch._ops.OpOverload, tuple[_Function, tuple[int, ...]]] = {}


def register_autograd(
    op: torch._ops.OpOverload, backward: Callable, setup_context: Callable, mutated_args: tuple[int, ...] = ()
) -> None:
    """Registers how autograd records op: backward(ctx, *grads) returns one gradient (or None) per argument of
    the op's schema; setup_context(ctx, inputs, output) saves what backward needs.

    A functional op gets them through torch.library.register_autograd (what torch.ops callers, torch.compile,
    opcheck and the plain mode go through), and two autograd.Functions built from the same two functions for
    the eager mode. torch's generated Function re-dispatches in Python and rebuilds the argument list from the
    schema on every call, a cost comparable to a small op's own run time.
    The first eager Function is one piece (ctx first) for plain calls; the second has the pieces in the form
    torch.func transforms accept (forward without ctx, setup_context), and lets vmap batch forward and backward
    by running them per sample (generate_vmap_rule), as it runs the ops themselves. The first skips the binding
    of arguments to forward's signature that torch does on every call of the second.

    An op that writes into the arguments at mutated_args gets one Function that marks them dirty and returns
    them; it records the op in both modes (torch.library registers autograd for functional ops only)."""
    name = op.name().replace("::", "_")

    def jvp(ctx, *tangents):
        raise forward_mode_error(op.name())

    if mutated_args:

        def forward_in_place(ctx, *args):
            op(*args)
            written = tuple(args[i] for i in mutated_args)
            ctx.mark_dirty(*written)
            setup_context(ctx, args, None)
            return written

        function = type(
            f"{name}_Function",
            (torch.autograd.Function,),
            {"forward": staticmethod(forward_in_place), "backward": staticmethod(backward)},
        )
        _MUTATING[op] = (function, tuple(mutated_args))
        return

    torch.library.register_autograd(op, backward, setup_context=setup_context)

    def forward_below_autograd(*args):
        with _below_autograd():
            return op(*args)

    def forward(ctx, *args):
        output = forward_below_autograd(*args)
        setup_context(ctx, args, output)
        return output

    function = type(
        f"{name}_Function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward), "jvp": staticmethod(jvp)},
    )
    transformable = type(
        f"{name}_Function_Transformable",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward_below_autograd),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
            "generate_vmap_rule": True,
        },
    )
    _EAGER_AUTOGRAD[op] = (function, transformable)


def call_op(op: torch._ops.OpOverload, *args):
    """Calls a vlfuse op with every argument of its schema, defaults included (the eager Functions take the
    argument list as it is). An op that writes into its arguments returns them when recorded, None otherwise.

    Eager mode: when autograd has nothing to record (grad mode off, or no argument requires grad) the call goes
    straight below the Autograd key: the kernel torch.library.register_autograd puts there is Python, and its
    no-grad branch, which only re-dispatches, costs as much as the whole op on a small input (figures in
    benchmarks/results/design-measurements.md). A call to record is recorded by
    the op's eager Function (register_autograd), except under autocast: the dispatcher runs an op's autocast
    rule before its Autograd kernel, so autograd records the casts, while the Function would record the uncast
    call and cast inside it. Inside a torch.compile trace the op is called as it is, for the graph to record it.
    Plain mode: the op is called as it is."""
    return _call(op, args, _eager_autograd)


def call_op_eager(op: torch._ops.OpOverload, *args):
    """``call_op`` as the eager mode calls it, whichever mode is on (where the private APIs are known to work):
    for the forward of a public function's own Function, whose inner op must not meet torch.library's generated
    Function under torch.func (pytorch/pytorch#179652) in the plain mode either."""
    return _call(op, args, private_api_problem() is None)


def _call(op: torch._ops.OpOverload, args: tuple, eager: bool):
    require_native()
    mutating = _MUTATING.get(op)
    if mutating is not None:
        function, written = mutating
        if torch.is_grad_enabled() and any(args[i].requires_grad for i in written):
            return function.apply(*args)
        return op(*args)
    if not eager or torch.compiler.is_compiling():
        return op(*args)
    # Under torch.func, or with a forward-AD level open, the call goes through the Function even with nothing
    # to record: below autograd, forward-mode tangents would be dropped without a word, where the Function's
    # jvp says that the op has none.
    transforms = _transforms_active()
    record = torch.is_grad_enabled() and _any_requires_grad(*args)
    if record or transforms or _forward_ad_open():
        recorded = _EAGER_AUTOGRAD.get(op)
        if recorded is None or _autocast_enabled():
            return op(*args)
        function, transformable = recorded
        return (transformable if transforms else function).apply(*args)
    with _below_autograd():
        return op(*args)


def must_record(*tensors: torch.Tensor) -> bool:
    """Whether a public function that records itself (see the module's docstring) must go through its Function:
    autograd has something to record, or (outside torch.compile) a torch.func transform or a forward-AD level is
    active, which the Function answers for (the transforms) or refuses (forward mode)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    if torch.compiler.is_compiling() or private_api_problem() is not None:
        return False
    return _transforms_active() or _forward_ad_open()


def forward_mode_error(op_name: str) -> RuntimeError:
    return RuntimeError(
        f"vlfuse: {op_name} has no forward-mode derivative (torch.func.jvp / jacfwd, "
        "torch.autograd.forward_ad); use reverse mode (backward, torch.func.grad / vjp / jacrev)"
    )

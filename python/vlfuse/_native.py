"""Loads the compiled library. A missing or broken build warns instead of failing the import, so the eager
references (and everything built on them, e.g. ``backend="eager"``) keep working; calling an op then raises."""

from __future__ import annotations

import warnings

import torch

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


def call_op(op: torch._ops.OpOverload, *args):
    """Calls a vlfuse op. When autograd has nothing to record (grad mode off, or no argument requires grad) the
    call goes straight below the Autograd key: the kernel torch.library.register_autograd puts there is Python,
    and its no-grad branch, which only re-dispatches, costs as much as the whole op on a small input (a 4-token
    merge2x2 took 33 us through it and 16 us below it, on a 2-core Zen 4 VM). Inside a torch.compile trace the
    op is called as it is, for the graph to record it."""
    require_native()
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)

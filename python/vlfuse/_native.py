"""Loads the compiled library. A missing or broken build warns instead of failing the import, so the eager
references (and everything built on them, e.g. ``backend="eager"``) keep working; calling an op then raises."""

from __future__ import annotations

import warnings

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

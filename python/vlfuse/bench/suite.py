"""The case list: every family's cases in one order, and the selections the CLI offers."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from . import linear_act, merge, model, patchify, pos_embed, qwen3, rope
from .core import Case

# each module's cases() lists what it measures; a case whose op or model is not in this build is reported skipped
FAMILIES = (rope, patchify, merge, pos_embed, linear_act, model, qwen3)


def all_cases() -> list[Case]:
    return [case for family in FAMILIES for case in family.cases()]


def select(cases: Sequence[Case], quick: bool = False, patterns: Sequence[str] = ()) -> list[Case]:
    """--quick keeps the cases marked quick; patterns (shell-style, matched against the case id
    "op/case/dtype/pass", case-insensitive) keep the cases matching any of them."""
    chosen = [c for c in cases if c.quick] if quick else list(cases)
    if patterns:
        lowered = [p.lower() for p in patterns]
        chosen = [c for c in chosen if any(fnmatch.fnmatch(c.id.lower(), p) for p in lowered)]
    return chosen

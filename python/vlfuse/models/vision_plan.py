"""The plan of one vision-tower call: everything the tower derives from ``grid_thw``, computed once on the host.

The tower runs its blocks over a *running order* of the tokens that differs from the patch order only by moving
whole merge units (the m x m windows that the merger concatenates), so that attention segments of equal length sit
next to each other: frames are stably sorted by their token count, and in a windowed tower (Qwen2.5-VL) each frame's
attention windows are stably sorted by their size. Every run of equal-length segments is then one batched SDPA call
(:class:`vlfuse.nn.attention.SegmentLayout`): no S x S mask, and one call per distinct length rather than one per
image. Every per-token step (norms, GEMMs, rotary with each token's own position) does not care about the order; the
merger's m^2-token rows stay whole, and its output rows are put back in patch order with one gather.

A plan holds host integers (segment groups, chunk bounds) and small device tensors (positions, unit orders), so a
tower forward given a plan reads nothing back from the device: it can be built ahead (in a data loader), compiled
as one graph (the host integers become symbolic under ``torch.compile(dynamic=True)``) and captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..nn.attention import SegmentLayout

__all__ = ["VisionPlan", "host_grid"]

Grid = tuple[tuple[int, int, int], ...]


def host_grid(grid_thw: Tensor | Sequence[Sequence[int]], merge_size: int) -> Grid:
    """grid_thw [items, 3] (t, h, w in patches; a tensor on any device, read once, or a list) as host integers,
    with a clear error for rows that no tower can run."""
    if isinstance(grid_thw, Tensor):
        if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
            raise ValueError(f"grid_thw must be [items, 3] (t, h, w in patches), got shape {tuple(grid_thw.shape)}")
        rows = grid_thw.detach().to("cpu", torch.int64).tolist()
    else:
        rows = [list(r) for r in grid_thw]
    grid = tuple(tuple(int(v) for v in r) for r in rows)
    for row in grid:
        if len(row) != 3 or min(row) <= 0 or row[1] % merge_size or row[2] % merge_size:
            raise ValueError(
                f"grid_thw rows must be (t, h, w) positive with h and w multiples of the merge size {merge_size}, "
                f"got {[list(r) for r in grid]}"
            )
    return grid


def _frame_windows(units_h: int, units_w: int, window_units: int) -> list[list[int]]:
    """Unit indices (row-major in the frame's unit grid) of each attention window, windows row-major: the order of
    HF's ``get_vision_window_index``; a window at the right or bottom edge holds what is left."""
    windows = []
    for wh in range(0, units_h, window_units):
        for ww in range(0, units_w, window_units):
            windows.append(
                [
                    r * units_w + c
                    for r in range(wh, min(wh + window_units, units_h))
                    for c in range(ww, min(ww + window_units, units_w))
                ]
            )
    return windows


@dataclass(frozen=True, eq=False)
class VisionPlan:
    """What one tower call needs besides the pixels. Build it with :meth:`build`.

    tokens:         S, the patch count (sum of t * h * w)
    grid:           the host grid, ((t, h, w), ...)
    grid_thw:       the same grid as an [items, 3] int64 tensor on the plan's device (for ops that take a grid
                    tensor, such as the position-table resampling)
    positions:      [S, 2] int64 (h, w) rotary positions of the tokens in running order
    unit_order:     [S / m^2] int64, the patch-order merge unit at each running position; None when the running
                    order is the patch order
    unit_restore:   [S / m^2] int64, the running position of each patch-order merge unit (the inverse); or None
    full:           attention segments of the full-attention blocks (one per frame), in running order
    window:         attention segments of the windowed blocks (Qwen2.5-VL), or None for a tower without windows
    window_order:   [S / m^2] int64, the running position of each unit in HF's window order (what HF's windowed
                    tower returns as its last hidden state), or None
    chunks:         for chunked encoding, ((first patch row, end row, plan of that chunk), ...) over whole frames in
                    patch order; empty when the call runs in one piece
    """

    tokens: int
    merge_size: int
    grid: Grid
    grid_thw: Tensor
    positions: Tensor
    unit_order: Tensor | None
    unit_restore: Tensor | None
    full: SegmentLayout
    window: SegmentLayout | None
    window_order: Tensor | None
    chunks: tuple[tuple[int, int, VisionPlan], ...] = ()

    @classmethod
    def build(
        cls,
        grid_thw: Tensor | Sequence[Sequence[int]],
        merge_size: int = 2,
        window_units: int = 0,
        device: torch.device | str | None = None,
        max_tokens: int | None = None,
    ) -> VisionPlan:
        """The plan for grid_thw [items, 3] (a CPU tensor or list: no device read; a device tensor is read once).

        merge_size:   the merger's m
        window_units: the attention window's side in merge units (Qwen2.5-VL: window_size // m // patch_size),
                      0 for a tower whose blocks all attend over whole frames
        device:       where the plan's tensors go (the tower's device)
        max_tokens:   split the call into chunks of whole frames of at most this many patches each (a larger frame
                      is a chunk of its own): peak activation memory then follows max_tokens, not the input
        """
        grid = host_grid(grid_thw, merge_size)
        if max_tokens is not None:
            if max_tokens <= 0:
                raise ValueError(f"max_tokens must be a positive patch count, got {max_tokens}")
            return cls._chunked(grid, merge_size, window_units, device, max_tokens)
        return cls._single(grid, merge_size, window_units, device)

    @classmethod
    def _single(cls, grid: Grid, merge_size: int, window_units: int, device) -> VisionPlan:
        mm = merge_size * merge_size
        # Every frame: (token count, its units in running order, its window sizes in tokens), in patch order.
        frames: list[tuple[int, list[int], list[int]]] = []
        hf_window_units: list[int] = []  # patch-order units in HF's window order
        unit_start = 0
        for t, h, w in grid:
            units_h, units_w = h // merge_size, w // merge_size
            per_frame = units_h * units_w
            windows = _frame_windows(units_h, units_w, window_units) if window_units else [list(range(per_frame))]
            by_size = sorted(windows, key=len, reverse=True)  # stable: equal sizes keep their order
            for f in range(t):
                base = unit_start + f * per_frame
                hf_window_units.extend(base + u for win in windows for u in win)
                frames.append(
                    (per_frame * mm, [base + u for win in by_size for u in win], [len(win) * mm for win in by_size])
                )
            unit_start += t * per_frame
        tokens = unit_start * mm
        ordered = sorted(frames, key=lambda frame: frame[0], reverse=True)
        unit_order_list = [u for frame in ordered for u in frame[1]]
        full = SegmentLayout.from_lengths([frame[0] for frame in ordered])
        window_sizes = [size for frame in ordered for size in frame[2]]
        window = SegmentLayout.from_lengths(window_sizes) if window_units else None

        unit_order = torch.tensor(unit_order_list, dtype=torch.int64)
        identity = bool(torch.equal(unit_order, torch.arange(unit_start)))
        unit_restore = torch.empty_like(unit_order)
        unit_restore[unit_order] = torch.arange(unit_start)
        grid_thw = torch.tensor(grid, dtype=torch.int64).reshape(-1, 3)
        positions = ops.vision_positions(grid_thw, merge_size)
        if not identity:
            positions = positions.view(unit_start, mm, 2)[unit_order].view(tokens, 2)
        window_order = unit_restore[torch.tensor(hf_window_units, dtype=torch.int64)] if window_units else None
        return cls(
            tokens=tokens,
            merge_size=merge_size,
            grid=grid,
            grid_thw=grid_thw.to(device),
            positions=positions.to(device),
            unit_order=None if identity else unit_order.to(device),
            unit_restore=None if identity else unit_restore.to(device),
            full=full,
            window=window,
            window_order=None if window_order is None else window_order.to(device),
        )

    @classmethod
    def _chunked(cls, grid: Grid, merge_size: int, window_units: int, device, max_tokens: int) -> VisionPlan:
        pieces: list[list[tuple[int, int, int]]] = [[]]
        sizes = [0]
        for t, h, w in grid:
            frame = h * w
            left = t
            while left:
                room = (max_tokens - sizes[-1]) // frame
                if room == 0 and sizes[-1]:
                    pieces.append([])
                    sizes.append(0)
                    continue
                take = min(left, max(room, 1))
                pieces[-1].append((take, h, w))
                sizes[-1] += take * frame
                left -= take
        chunks = []
        row = 0
        for piece, size in zip(pieces, sizes):
            chunks.append((row, row + size, cls._single(tuple(piece), merge_size, window_units, device)))
            row += size
        if len(chunks) == 1:
            return chunks[0][2]
        first = chunks[0][2]
        return cls(
            tokens=row,
            merge_size=merge_size,
            grid=grid,
            grid_thw=torch.tensor(grid, dtype=torch.int64, device=first.grid_thw.device).reshape(-1, 3),
            positions=first.positions.new_empty(0, 2),
            unit_order=None,
            unit_restore=None,
            full=SegmentLayout((), 0),
            window=SegmentLayout((), 0) if window_units else None,
            window_order=None,
            chunks=tuple(chunks),
        )

    def check(self, pixel_values: Tensor) -> None:
        """Raises when the plan does not describe pixel_values [S, ...] (a shape test: no device read)."""
        if pixel_values.shape[0] != self.tokens:
            raise ValueError(
                f"grid_thw {[list(r) for r in self.grid]} describes {self.tokens} patches but pixel_values has "
                f"{pixel_values.shape[0]}"
            )

"""Models on the vlfuse ops: ``VisionTower`` (the Qwen VL family's vision tower, from HF weights with
``VisionTower.from_hf``), its per-call ``VisionPlan``, and the Qwen2-VL model package (``vlfuse.models.qwen2_vl``)."""

from .vision_plan import VisionPlan
from .vision_tower import VisionTower

__all__ = ["VisionPlan", "VisionTower"]

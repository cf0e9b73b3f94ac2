"""Qwen2-VL on the vlfuse ops: ``Qwen2VL`` (vision tower + Qwen2 LLM with multimodal RoPE, HF checkpoints,
generation), ``Qwen2VLConfig`` (presets and HF config.json), ``Qwen2VLProcessor`` and the tokenizers.

    from vlfuse.models.qwen2_vl import Qwen2VL, Qwen2VLProcessor
    model = Qwen2VL.from_pretrained(folder)
    processor = Qwen2VLProcessor.from_pretrained(folder)
    inputs = processor(processor.chat_prompt("Describe the image.", num_images=1), images=[image])
    answer = model.generate(**inputs, max_new_tokens=64)[:, inputs["input_ids"].shape[1]:]
    print(processor.decode(answer[0]))
"""

from .checkpoint import CheckpointError
from .config import Qwen2VLConfig, Qwen2VLVisionConfig
from .import_vit import ImportReport, import_vit
from .model import Qwen2VL, Qwen2VLOutput
from .positions import mrope_freqs, rope_index
from .processor import Qwen2VLProcessor
from .tokenizer import CharTokenizer, HFTokenizer, load_tokenizer
from .vision import VisionTransformer

__all__ = [
    "Qwen2VL",
    "Qwen2VLConfig",
    "Qwen2VLVisionConfig",
    "Qwen2VLOutput",
    "Qwen2VLProcessor",
    "CharTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "CheckpointError",
    "VisionTransformer",
    "import_vit",
    "ImportReport",
    "rope_index",
    "mrope_freqs",
]

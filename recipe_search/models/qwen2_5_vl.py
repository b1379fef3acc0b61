"""Qwen2.5-VL: Qwen2-VL's decoder and token layout (M-RoPE, image and video placeholders) behind a
windowed-attention vision tower; everything the runtime needs is shared with Qwen2-VL."""
from __future__ import annotations

from .base import register_family
from .qwen2_vl import QwenVLAdapter


@register_family
class Qwen2_5_VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"

"""Qwen2-VL and Qwen2.5-VL: ViT with 2x2 patch merger, Qwen2 decoder with multimodal (3-D) RoPE,
images and video, dynamic resolution."""
from __future__ import annotations

from typing import Any

import torch

from .base import ModelAdapter, register_family


class MRopeMixin:
    """Decode positions for M-RoPE decoders that keep per-row `rope_deltas` after the prefill."""

    model: Any

    def decode_position_ids(self, text_positions: torch.Tensor) -> torch.Tensor:
        """(4, B, q): the text row plus three M-RoPE rows shifted by the model's stored rope deltas."""
        deltas = self.model.model.rope_deltas
        if deltas is None:
            raise RuntimeError("continuation without a prefill: the M-RoPE deltas are unknown")
        batch = text_positions.shape[0]
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(text_positions.device)
        mrope = (text_positions + deltas).unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text_positions.unsqueeze(0), mrope], dim=0)


@register_family
class Qwen2VLAdapter(MRopeMixin, ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    modalities = "image, multi-image, video"

    @property
    def video_token_id(self) -> int | None:
        return self._token_id("video_token_id")

    def visual_tokens_per_image(self) -> None:
        return None  # dynamic resolution: the count follows each image's grid

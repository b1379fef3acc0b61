"""Qwen2-VL: ViT with 2x2 patch merger, Qwen2 decoder with multimodal (3-D) RoPE."""
from __future__ import annotations


import torch

from .base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)

    def visual_tokens_per_image(self) -> None:
        return None  # dynamic resolution: the count follows each image's grid


    def decode_position_ids(self, text_positions: torch.Tensor) -> torch.Tensor:
        """(4, B, q): the text row plus three M-RoPE rows shifted by the model's stored rope deltas."""
        deltas = self.model.model.rope_deltas
        if deltas is None:
            raise RuntimeError("Qwen2-VL continuation without a prefill: rope deltas are unknown")
        batch = text_positions.shape[0]
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(text_positions.device)
        mrope = (text_positions + deltas).unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text_positions.unsqueeze(0), mrope], dim=0)

"""Aya Vision (AyaVisionForConditionalGeneration): SigLIP tower with a pixel-shuffle projector and a
Cohere 2 decoder.

Cohere 2 differs from Llama-style decoders in ways the score math must follow: one LayerNorm feeds
attention and MLP in parallel (the attention input is still `input_layernorm(hidden)`), RoPE is in
the interleaved layout (the attention module's own `apply_rotary_pos_emb`, taken by the default),
sliding-window layers alternate with full-attention layers, and the full-attention layers use no
position embedding at all (NoPE) although the decoder passes them the same (cos, sin).

The processor tiles an image into crops of the tower's size plus a global thumbnail; each crop
gives a fixed number of `<|IMG_PATCH|>` tokens after a `TILE_k` / `TILE_GLOBAL` marker. Only the
patch tokens are prunable; the markers and `<|START_OF_IMG|>` / `<|END_OF_IMG|>` stay as text. The
model config does not record the marker ids, so the selection unit is one crop (every crop has the
same token count, reported as `visual_tokens_per_image`); a `pooled` plan pools a prompt's crops.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ModelAdapter, pil_processor, register_family


@register_family
class AyaVisionAdapter(ModelAdapter):
    family = "aya_vision"
    model_types = ("aya_vision",)
    model_class = "AyaVisionForConditionalGeneration"
    modalities = "image, multi-image"

    def visual_tokens_per_image(self) -> int:
        """Tokens of one crop (tile or thumbnail): the tower's patch grid after pixel shuffle."""
        vc = self.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size) // int(self.config.downsample_factor)
        return side * side

    def query_key(self, layer: nn.Module, hidden: torch.Tensor,
                  rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """As the default, but full-attention layers rotate nothing: Cohere 2 applies RoPE only in
        its sliding-window layers (`self_attn.sliding_window` set)."""
        if getattr(layer.self_attn, "sliding_window", None) is None:
            rope = None
        return super().query_key(layer, hidden, rope)

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """AyaVisionProcessor with the PIL GOT-OCR2 image processor (no torchvision)."""
        from transformers import AyaVisionProcessor, GotOcr2ImageProcessorPil

        return pil_processor(source, AyaVisionProcessor, GotOcr2ImageProcessorPil)


"""LLaVA (llava-hf checkpoints and the embedded demo): CLIP-style tower, projector, Llama decoder."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from .base import ModelAdapter, chat_prompt


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)

    def visual_tokens_per_image(self) -> int:
        vc = self.config.vision_config
        patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
        # "default" drops the CLS feature, "full" keeps it.
        return patches + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def build_inputs(
        self, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        processor.tokenizer.padding_side = "left"
        texts = [chat_prompt(processor, p) for p in prompts]
        batch = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        return dict(batch)

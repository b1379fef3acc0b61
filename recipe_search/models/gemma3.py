"""Gemma 3 (Gemma3ForConditionalGeneration): SigLIP tower, pooled to a fixed number of soft tokens
per image, and a Gemma 3 decoder with q/k norms, `query_pre_attn_scalar` scaling, interleaved
sliding-window and global layers with their own rotary bases, and bidirectional attention among
the tokens of one image during the prefill.

Only the `<image_soft_token>` placeholders carry vision features and may be pruned; the
`<start_of_image>` / `<end_of_image>` markers around them stay as text. The bidirectional image
block, the sliding windows and each layer type's rotary table are the model's own, gathered at the
surviving positions by the runtime; decode steps are text queries, so their masks are causal.
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torch import nn

from .base import ModelAdapter, UnsupportedModelError, pil_processor, register_family


@register_family
class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"
    modalities = "image, multi-image"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(self.text_config, "use_bidirectional_attention", False):
            # every text token would attend forwards too: decode masks are then not causal
            raise UnsupportedModelError("gemma3 with use_bidirectional_attention (an encoder) cannot generate; "
                                        "only causal Gemma 3 checkpoints are supported")

    def visual_tokens_per_image(self) -> int:
        return int(self.config.mm_tokens_per_image)

    def attention_logits(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Scaled by 1/sqrt(query_pre_attn_scalar); no soft-capping: Gemma 3's attention does not
        pass `attn_logit_softcapping` to its attention function, whatever the config says."""
        return (q.float() @ k.float().transpose(-1, -2)) * float(layer.self_attn.scaling)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head only: Gemma3ForConditionalGeneration does not apply the text
        config's `final_logit_softcapping` (only the text-only Gemma3ForCausalLM does)."""
        return self.model.get_output_embeddings()(self.decoder().norm(hidden))

    # -- inputs --------------------------------------------------------------------------------
    @classmethod
    def load_processor(cls, source: str) -> Any:
        """Gemma3Processor with the PIL image processor (no torchvision, no video processor)."""
        from transformers import Gemma3Processor, Gemma3ImageProcessorPil

        return pil_processor(source, Gemma3Processor, Gemma3ImageProcessorPil)

    def processor_images(self, per_prompt: list[list[Image.Image]]) -> Any:
        """Gemma3Processor wants one list of images per prompt (it counts them per prompt)."""
        return per_prompt

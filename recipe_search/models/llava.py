"""LLaVA-1.5 (llava-hf checkpoints and the embedded demo): CLIP or SigLIP tower, projector, and a
Llama, Mistral (sliding window) or Qwen2 decoder."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .base import ModelAdapter, VisionLayout, register_family


class ViTTowerMixin:
    """Vision-side access for towers built of CLIP/SigLIP encoder layers (`layer_norm1`, `self_attn`)."""

    def vision_query_key(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        bsz, length, _ = x.shape
        q = attn.q_proj(x).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        return q, k, float(attn.scale)


@register_family
class LlavaAdapter(ViTTowerMixin, ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"

    def visual_tokens_per_image(self) -> int:
        vc = self.config.vision_config
        patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
        # "default" drops the CLS feature, "full" keeps it.
        return patches + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def _tower(self) -> nn.Module:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)  # older transformers wrap the transformer once more

    def vision_layers(self) -> Sequence[nn.Module]:
        return self._tower().encoder.layers

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def vision_layout(self) -> VisionLayout:
        """CLIP-style towers with CLS (strategy "default") or towers without CLS such as SigLIP ("full")."""
        vc, layer = self.config.vision_config, self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("vision-side selection needs a single vision_feature_layer, not a list")
        has_cls = hasattr(self._tower().embeddings, "class_embedding")
        if has_cls != (self.config.vision_feature_select_strategy == "default"):
            raise ValueError("vision-side selection supports a CLS tower with strategy 'default' or a tower "
                             "without CLS with strategy 'full'")
        depth = int(vc.num_hidden_layers)
        macs = sum(m.in_features * m.out_features for m in self.projector().modules() if isinstance(m, nn.Linear))
        return VisionLayout(num_layers=depth, hidden_size=int(vc.hidden_size),
                            intermediate_size=int(vc.intermediate_size), feature_index=layer % (depth + 1),
                            has_cls=has_cls, patches=(int(vc.image_size) // int(vc.patch_size)) ** 2,
                            projector_macs_per_token=macs)

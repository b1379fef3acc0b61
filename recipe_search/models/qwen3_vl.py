"""Qwen3-VL: Qwen2-VL's token layout with q/k-normed attention, interleaved M-RoPE (composed inside
the rotary embedding, so the layers rotate as usual) and DeepStack.

DeepStack: the text model adds features from intermediate vision layers to the hidden states of
the visual positions after each of its first few decoder layers, indexing them with the prompt's
full-length `visual_pos_masks`. Once tokens are dropped that indexing no longer fits the shorter
sequence, so while a pruning plan is attached the adapter takes the features out of the text
model's call and adds each layer's share to the visual tokens that are still alive, after that
layer, exactly as the model would have added them to those tokens.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..hooks import ModelHook
from .base import LiveTokens, register_family
from .qwen2_vl import QwenVLAdapter


class _DeepstackFeatures:
    """One forward's DeepStack inputs, held between the text model's call and its layers."""

    def __init__(self) -> None:
        self.masks: torch.Tensor | None = None      # (B, L) visual positions of the prompt
        self.embeds: list[torch.Tensor] = []         # per layer (n_visual, d), in row-major mask order
        self.index: torch.Tensor | None = None      # (B, L) row of `embeds[i]` for each visual position
        self.inside = False                          # the text model's forward is running

    def take(self, masks: torch.Tensor | None, embeds: list[torch.Tensor] | None) -> None:
        self.masks, self.embeds = masks, list(embeds or [])
        self.index = None if masks is None else masks.flatten().long().cumsum(0).view_as(masks) - 1

    def clear(self) -> None:
        self.take(None, None)


class _TakeDeepstack(ModelHook):
    """Pre-hook on the text model: keep the features for the layer hooks, so the model injects none."""

    def __init__(self, features: _DeepstackFeatures) -> None:
        self.features = features

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("deepstack_visual_embeds")
        masks = kwargs.get("visual_pos_masks")
        self.features.take(masks if embeds is not None else None, embeds)
        self.features.inside = True
        if embeds is None:
            return None
        return args, {**kwargs, "deepstack_visual_embeds": None, "visual_pos_masks": None}

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        self.features.clear()  # a later forward (or a layer run on its own) never sees stale features
        self.features.inside = False
        return None


class _AddDeepstack(ModelHook):
    """Post-hook on decoder layer `idx`: add its DeepStack features to the live visual tokens."""

    def __init__(self, idx: int, features: _DeepstackFeatures, live: Callable[[], LiveTokens | None]) -> None:
        self.idx, self.features, self.live = idx, features, live

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        f = self.features
        tokens = self.live()
        if not f.inside and tokens is not None:
            raise RuntimeError("Qwen3-VL adds DeepStack features inside its text model's forward; code that runs "
                               "decoder layers one by one under a pruning plan must replay the text model's call "
                               "with PruningHandle.enter_decoder() first")
        if f.masks is None or f.index is None or self.idx >= len(f.embeds):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        masks = f.masks.to(hidden.device)
        index = f.index.to(hidden.device)
        if tokens is not None:  # a pruned prefill: slot j of row b holds original column cols[b, j]
            cols = tokens.cols.to(hidden.device)
            at = cols.clamp(min=0)
            masks = masks.gather(1, at) & (cols >= 0)
            index = index.gather(1, at)
        if masks.shape != hidden.shape[:2]:
            raise RuntimeError("DeepStack features do not match the live tokens of this prefill")
        embeds = f.embeds[self.idx].to(hidden.device, hidden.dtype)
        hidden = hidden.clone()
        hidden[masks, :] = hidden[masks, :] + embeds[index[masks]]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@register_family
class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"

    def prefill_hooks(self, live: Callable[[], LiveTokens | None]) -> list[tuple[nn.Module, ModelHook]]:
        """DeepStack moved from the text model's loop to post-hooks that follow the live visual tokens.

        With nothing dropped the hooks add the same features to the same positions in the same
        way as `Qwen3VLTextModel._deepstack_process`, so a keep-all plan stays bit-identical.
        """
        features = _DeepstackFeatures()
        hooks: list[tuple[nn.Module, ModelHook]] = [(self.decoder(), _TakeDeepstack(features))]
        hooks += [(layer, _AddDeepstack(i, features, live)) for i, layer in enumerate(self.decoder_layers())]
        return hooks

"""Mistral 3 (Mistral3ForConditionalGeneration: Mistral Small 3.x and kin): a Pixtral vision tower at
the image's own resolution, a 2x2 patch merger, and a Mistral (or Ministral 3) decoder.

An image of h x w merged patches is written as h rows of w `[IMG]` tokens, each row closed by
`[IMG_BREAK]` and the last one by `[IMG_END]`. Only `[IMG]` tokens carry vision features and may be
pruned; the break and end tokens stay as text. The count varies with the image size, so plans give
each image the fractions of its own count, and one image (all its rows) is one selection unit.

transformers' PixtralProcessor (and its image processor) import torchvision, so without it the
processor cannot be built; `load_processor` then says so in one line.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import ModelAdapter, register_family


@register_family
class Mistral3Adapter(ModelAdapter):
    family = "mistral3"
    model_types = ("mistral3",)
    model_class = "Mistral3ForConditionalGeneration"
    modalities = "image, multi-image"

    def visual_tokens_per_image(self) -> None:
        return None  # native resolution: the count follows each image's size

    def visual_groups(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) image index of each `[IMG]` token, -1 elsewhere: the rows of one image are one group.

        Rows are runs of `[IMG]` separated by exactly one token. The config does not record the ids
        of `[IMG_BREAK]` / `[IMG_END]`, so the end id is read from the layout itself: the separator
        after the last row of a chain of rows (followed by text) is `[IMG_END]`; inside a chain, a
        separator with that id ends one image and the next row starts another (images written back
        to back).
        """
        visual = self.visual_mask(input_ids)
        groups = torch.full_like(input_ids, -1)
        length = input_ids.shape[1]
        for row in range(input_ids.shape[0]):
            pos = visual[row].nonzero()[:, 0].tolist()
            if not pos:
                continue
            runs: list[tuple[int, int]] = []  # (first, last) column of each row of [IMG]
            for p in pos:
                if runs and p == runs[-1][1] + 1:
                    runs[-1] = (runs[-1][0], p)
                else:
                    runs.append((p, p))
            ids = input_ids[row].tolist()
            sep = [ids[last + 1] if last + 1 < length else None for _, last in runs]
            chained = [runs[i + 1][0] == runs[i][1] + 2 for i in range(len(runs) - 1)] + [False]
            ends: set[int] = {s for s, c in zip(sep, chained) if not c and s is not None}
            image = 0
            for i, (first, last) in enumerate(runs):
                groups[row, first:last + 1] = image
                if not chained[i] or sep[i] in ends:
                    image += 1
        return groups

    def context_length(self) -> int | None:
        """The config's context, capped where a Ministral 3 decoder starts scaling queries by
        position (the score rows do not see positions, so they are exact only below it)."""
        tc = self.text_config
        value = getattr(tc, "max_position_embeddings", None)
        limit = int(value) if value else None
        rope = getattr(tc, "rope_parameters", None) or {}
        if rope.get("llama_4_scaling_beta") and rope.get("original_max_position_embeddings"):
            cap = int(rope["original_max_position_embeddings"])
            limit = cap if limit is None else min(limit, cap)
        return limit

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """The checkpoint's PixtralProcessor; it needs torchvision, which is said in one line if missing."""
        try:
            import torchvision  # noqa: F401  (PixtralProcessor and its image processor import it)
        except ImportError:
            raise ImportError("the Mistral 3 (Pixtral) processor needs torchvision: pip install torchvision") from None
        return super().load_processor(source)

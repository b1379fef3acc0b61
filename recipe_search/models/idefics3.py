"""Idefics3 (SigLIP tower, pixel-shuffle connector, Llama 3 decoder) and the code SmolVLM shares with it.

The processor splits an image into a grid of tiles plus one global (downscaled) view and writes each
tile as `<fake_token_around_image><row_r_col_c>` + `<image>` x n, then
`<fake_token_around_image><global-img>` + `<image>` x n + `<fake_token_around_image>` for the global view.
Only `<image>` positions carry vision features and are pruned; the fake, row/col and global tags are
text. For the per-image policy all tiles of one image are one group: every image ends with its global
view, so a run of `<image>` tokens closes an image when it is tagged like the last run of the prompt
(which is always a global view).
"""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import Idefics3Processor

from .base import ModelAdapter, register_family


class TiledImageAdapter(ModelAdapter):
    """Families whose processor writes an image as several tagged tiles ending with a global view."""

    def visual_tokens_per_image(self) -> None:
        return None  # the number of tiles follows each image's size

    def visual_groups(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) image index of each `<image>` token, -1 elsewhere: an image is the runs of tiles up to
        and including the next global view. The global view's tag is read from the prompt itself (the
        token before the last run), so it needs no tokenizer and holds with image splitting off."""
        visual = self.visual_mask(input_ids)
        length = input_ids.shape[1]
        pos = torch.arange(length, device=input_ids.device).expand_as(input_ids)
        starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
        before = torch.nn.functional.pad(input_ids, (1, 0), value=-1)[:, :-1]  # the token left of each one
        last_start = torch.where(starts, pos, -1).max(dim=1, keepdim=True).values
        global_tag = before.gather(1, last_start.clamp(min=0))
        closes = (starts & (before == global_tag)).long()  # first token of each global view
        images_before = torch.cumsum(closes, dim=1) - closes  # global views that started earlier
        run_start = torch.cummax(torch.where(starts, pos, 0), dim=1).values
        group = images_before.gather(1, run_start)
        return torch.where(visual, group, torch.full_like(group, -1))

    def processor_images(self, per_prompt: list[list[Image.Image]]) -> Any:
        """One list of images per prompt: the processor matches them to each prompt's `<image>` marks."""
        return per_prompt


@register_family
class Idefics3Adapter(TiledImageAdapter):
    family = "idefics3"
    model_types = ("idefics3",)
    model_class = "Idefics3ForConditionalGeneration"

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """Idefics3Processor has no video part: built directly, it takes the PIL image processor
        when torchvision is missing."""
        return Idefics3Processor.from_pretrained(source, local_files_only=True)

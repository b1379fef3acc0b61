"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, projector, Qwen2 decoder;
single images in "anyres" (as LLaVA-NeXT, see llava_next.py), several images per prompt, and video.

Visual tokens. Image placeholders (`image_token_id`) and video placeholders (`video_token_id`) are
both pruned, by the same rules and schedule. What sits at them:
* a single image of a prompt: base tile, then the unpadded high-resolution grid (bilinearly shrunk
  past `vision_aspect_ratio`), one `image_newline` per row: the count varies with the image size;
* each image of a multi-image prompt (the processor's `batch_num_images` > 1): its base tile and one
  newline, P + 1 tokens with P = (image_size / patch_size)^2;
* a video: every frame's features pooled 2x2 (ceil(side/2)^2 per frame), frame after frame, and one
  newline at the end of the video.
The newline positions are pruned like the rest, for the reasons given in llava_next.py.

Groups (the per-image policy: each group keeps its own share of the schedule):
* a video is one group: its frames compete for the video's share, so still frames can give up
  tokens to moving ones; `images="pooled"` lets a prompt's images and videos compete too;
* image and video placeholders never share a group, even written back to back;
* OneVision's chat template writes a prompt's images back to back ("<image><image>"), so a run of
  image placeholders whose length is k (P + 1), k >= 2, is read as k multi-image images of P + 1
  tokens, unless a single anyres image of this model can have that many tokens (then it stays one
  group; for SigLIP 384/14 with the released grid pinpoints no single image can, so real multi-image
  prompts always split). Anyres images written back to back without the processor (no
  `batch_num_images`) stay one group.

Vision-side selection rules are refused (the base class's one-line error), as for LLaVA-NeXT.

Without torchvision the OneVision video processor cannot be built: `load_processor` builds the
processor with the PIL image processor and no video processor, so processor-built inputs carry
images only; video inputs (`pixel_values_videos` and video placeholders) are built by the caller.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from PIL import Image

from .base import register_family
from .llava_next import LlavaNextAdapter, processor_from_folder


@register_family
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    modalities = "image, multi-image, video"

    @property
    def video_token_id(self) -> int | None:
        return self._token_id("video_token_id", "video_token_index")

    def _tile_side(self) -> int:
        vc = self.config.vision_config
        return int(vc.image_size) // int(vc.patch_size)

    def multi_image_tokens(self) -> int:
        """Tokens of one image in a multi-image prompt: its base tile and one newline."""
        return self._tile_side() ** 2 + 1

    @functools.cached_property
    def single_image_token_counts(self) -> frozenset[int]:
        """Every token count a single anyres image can have: each grid pinpoint, each amount of
        unpadding of either side, the shrink past `vision_aspect_ratio` (the processor's arithmetic)."""
        side, tile = self._tile_side(), int(self.config.vision_config.image_size)
        max_patches = int(str(self.config.vision_aspect_ratio).strip("anyres_max_"))
        counts = set()
        for pin_h, pin_w in self.config.image_grid_pinpoints:
            full_h, full_w = side * (pin_h // tile), side * (pin_w // tile)
            shapes = [(full_h - 2 * p, full_w) for p in range(full_h // 2 + 1)]
            shapes += [(full_h, full_w - 2 * p) for p in range(full_w // 2 + 1)]
            for h, w in shapes:
                ratio = math.sqrt(h * w / (max_patches * side ** 2))
                if ratio > 1.1:
                    h, w = int(h // ratio), int(w // ratio)
                counts.add(side ** 2 + h * (w + 1))
        return frozenset(counts)

    def visual_groups(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) group of each visual token: one per video, one per image (multi-image runs split),
        -1 elsewhere; see the module docstring."""
        visual = self.visual_mask(input_ids)
        before = torch.nn.functional.pad(input_ids, (1, 0), value=-1)[:, :-1]
        after = torch.nn.functional.pad(input_ids, (0, 1), value=-1)[:, 1:]
        starts = visual & (input_ids != before)  # a placeholder run starts where the id changes
        ends = visual & (input_ids != after)
        per_image = self.multi_image_tokens()
        for (row, start), (_, end) in zip(starts.nonzero().tolist(), ends.nonzero().tolist()):
            length = end - start + 1
            if (int(input_ids[row, start]) == self.image_token_id and length % per_image == 0
                    and length >= 2 * per_image and length not in self.single_image_token_counts):
                starts[row, start:end + 1:per_image] = True
        group = torch.cumsum(starts.long(), dim=1) - 1
        return torch.where(visual, group, torch.full_like(group, -1))

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """`LlavaOnevisionProcessor` with the PIL image processor and no video processor (images only):
        the OneVision video processor needs torchvision."""
        from transformers import LlavaOnevisionImageProcessorPil

        return processor_from_folder(images_only_processor_class(), LlavaOnevisionImageProcessorPil, source)

    def processor_images(self, per_prompt: list[list[Image.Image]]) -> Any:
        """One list per prompt: the processor reads it as `batch_num_images`, and a prompt with several
        images is encoded in OneVision's multi-image layout (base tile + newline per image)."""
        return per_prompt


@functools.cache
def images_only_processor_class() -> type:
    """`LlavaOnevisionProcessor` whose only sub-processors are the image processor and the tokenizer."""
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImagesProcessor(LlavaOnevisionProcessor):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    return LlavaOnevisionImagesProcessor

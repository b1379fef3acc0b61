"""LLaVA-NeXT (LLaVA-1.6, `LlavaNextForConditionalGeneration`): CLIP tower, projector and a Llama,
Mistral (sliding window) or Qwen2 decoder, with "anyres" images.

Visual tokens. An image gives its base tile (the whole image at the tower's resolution), then the
high-resolution tiles regridded and unpadded to the image's aspect ratio, row by row, each row closed
by the learned `image_newline` feature. Every one of these features sits at an `image_token_id`
placeholder, so the count depends on the image size (`visual_tokens_per_image()` is None) and the
rows of a batch keep different numbers of visual tokens (recipes use their `fractions`).

The image_newline positions are pruned like every other visual token. Decided because (1) they are
image-token placeholders like the rest, and where they fall follows from `image_sizes`, which the
runtime does not see: it prunes by id, and sparing them would need the contract to pass the
forward's inputs to `visual_groups`/`visual_mask`; (2) every rule ranks them with the same scores as
the patch features (attention received, key similarity), so a newline the text attends to is kept
and one nothing attends to goes; (3) schedules, FLOPs and recipe counts then cover every position
the LLM runs for the image.

Images. Each maximal run of image placeholders is one image for the per-image policy. The llava-hf
chat templates write "<image>\\n" per image, so the images of a multi-image prompt are separate
runs; two images written back to back with nothing between them form one group.

Vision-side selection rules are refused (the base class's one-line error): the tower encodes several
tiles per image whose features are cut, regridded, unpadded and interleaved with newlines before the
LLM, so a patch choice inside the tower does not map one-to-one onto placeholders.
"""
from __future__ import annotations

from typing import Any

from .base import ModelAdapter, register_family

_NOT_SUB_PROCESSORS = ("image_processor", "video_processor", "processor_class", "auto_map")


def processor_from_folder(processor_class: type, image_processor_class: type, source: str) -> Any:
    """`processor_class` built from a saved folder with the given (PIL) image processor and the saved
    tokenizer and processor settings (patch size, token counts, chat template): AutoProcessor would
    pick the torchvision image processor, and for video families the torchvision video processor."""
    from transformers import AutoTokenizer

    settings, _ = processor_class.get_processor_dict(source, local_files_only=True)
    kwargs = {k: v for k, v in settings.items() if k not in _NOT_SUB_PROCESSORS}
    return processor_class(image_processor=image_processor_class.from_pretrained(source, local_files_only=True),
                           tokenizer=AutoTokenizer.from_pretrained(source, local_files_only=True), **kwargs)


@register_family
class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    model_class = "LlavaNextForConditionalGeneration"

    def visual_tokens_per_image(self) -> None:
        return None  # anyres: base tile + unpadded high-resolution grid + one newline per row

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """`LlavaNextProcessor` with the PIL image processor: no torchvision needed."""
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        return processor_from_folder(LlavaNextProcessor, LlavaNextImageProcessorPil, source)

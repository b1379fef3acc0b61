"""InternVL ("-hf" checkpoints of InternVL2.5 / InternVL3): InternViT tower, pixel-shuffle projector, and a
Qwen2 (optionally sliding-window) or Llama decoder.

The processor cuts an image into up to `max_patches` tiles plus a thumbnail and writes
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`: all tiles of one image form one unbroken
run of `<IMG_CONTEXT>` tokens, and `</img><img>` separates two images, so the default grouping (each run
is one image) already gives the per-image policy one group per image. Video frames are written as
images (`<img>...</img>` per frame), so each frame is one group. `<img>` and `</img>` are text: only
`<IMG_CONTEXT>` positions are pruned.
"""
from __future__ import annotations

from typing import Any

from transformers import InternVLProcessor
from transformers.utils import is_torchvision_available

from .base import ModelAdapter, register_family


class InternVLImagesOnlyProcessor(InternVLProcessor):
    """transformers' InternVLProcessor without its video processor.

    InternVLProcessor cannot be built at all without torchvision (its video processor needs it), even
    for images. This subclass drops the video slot (a processor's parts are read from its `__init__`
    signature) and keeps every image code path of InternVLProcessor unchanged.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        # The parent passes video_processor=None on; ProcessorMixin only takes the parts this
        # signature names (image_processor, tokenizer), so no video processor is looked up.
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


@register_family
class InternVLAdapter(ModelAdapter):
    family = "internvl"
    model_types = ("internvl",)
    model_class = "InternVLForConditionalGeneration"
    modalities = "image, multi-image, video"

    def visual_tokens_per_image(self) -> None:
        return None  # tokens per tile are fixed, but the tile count follows each image's aspect ratio

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """The checkpoint's own processor when torchvision is installed; otherwise InternVL's image
        processing with the PIL image processor and no video processor."""
        if is_torchvision_available():
            return super().load_processor(source)
        return InternVLImagesOnlyProcessor.from_pretrained(source, local_files_only=True)

"""Qwen2-VL: ViT with a 2x2 patch merger, Qwen2 decoder with multimodal (3-D) RoPE, images and video
at dynamic resolution. Shared here with Qwen2.5-VL and Qwen3-VL (their modules subclass
`QwenVLAdapter`): M-RoPE decode positions from the model's stored rope deltas, image and video
placeholders, and a processor built from the PIL image processor without a video processor, so
loading a checkpoint never needs torchvision."""
from __future__ import annotations

import functools
from typing import Any

import torch
import transformers

from .base import ModelAdapter, register_family


class MRopeMixin:
    """Decode positions for M-RoPE decoders that keep per-row `rope_deltas` after the prefill."""

    model: Any

    def decode_position_ids(self, text_positions: torch.Tensor) -> torch.Tensor:
        """(4, B, q): the text row plus three M-RoPE rows shifted by the model's stored rope deltas."""
        deltas = self.model.model.rope_deltas
        if deltas is None:
            raise RuntimeError("continuation without a prefill: the M-RoPE deltas are unknown")
        batch = text_positions.shape[0]
        deltas = deltas.repeat_interleave(batch // deltas.shape[0], dim=0).to(text_positions.device)
        mrope = (text_positions + deltas).unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text_positions.unsqueeze(0), mrope], dim=0)


@functools.cache
def image_only_processor(processor_class: str) -> type:
    """The family's processor class (e.g. `Qwen2VLProcessor`) without its video processor.

    transformers 5.24 builds a Qwen processor with a video processor, and every Qwen video
    processor needs torchvision (AutoProcessor fails without it, even for images). Images alone
    need only the PIL image processor, so this subclass declares image processor and tokenizer as
    its only parts; `from_pretrained` loads exactly those (the PIL image processor explicitly)
    and keeps the checkpoint's chat template. Videos can still be given to the model directly
    (`pixel_values_videos`, `video_grid_thw`), just not through this processor.
    """
    base = getattr(transformers, processor_class)

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            # the base passes (image_processor, tokenizer, None) on; ProcessorMixin pairs positional
            # parts with this class's declared parts (image processor, tokenizer) only
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        @classmethod
        def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path: Any, processor_dict: Any = None,
                                           **kwargs: Any) -> list[Any]:
            kwargs.pop("subfolder", None)
            image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(
                pretrained_model_name_or_path, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
            return [image_processor, tokenizer]

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{processor_class}ImageOnly"
    return ImageOnlyProcessor


class QwenVLAdapter(MRopeMixin, ModelAdapter):
    """What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share: image and video placeholders whose count follows
    each image's grid, M-RoPE decode positions, and a torchvision-free processor."""

    modalities = "image, multi-image, video"
    #: transformers processor class of the family (loaded without its video processor).
    processor_class = "Qwen2VLProcessor"

    @property
    def video_token_id(self) -> int | None:
        return self._token_id("video_token_id")

    def visual_tokens_per_image(self) -> None:
        return None  # dynamic resolution: the count follows each image's grid

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """The checkpoint's processor with the PIL image processor and no video processor."""
        return image_only_processor(cls.processor_class).from_pretrained(source, local_files_only=True)


@register_family
class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"

"""SmolVLM / SmolVLM2: the Idefics3 layout (tagged tiles plus a global view per image, SigLIP tower,
pixel-shuffle connector, Llama decoder), so the adapter is Idefics3's with SmolVLM's processor.

Video frames are written as single global views (`<fake_token_around_image><global-img><image>...`), so
each frame is one group for the per-image policy.
"""
from __future__ import annotations

from typing import Any

from transformers import SmolVLMProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_num2words_available, is_torchvision_available

from .base import register_family
from .idefics3 import Idefics3Adapter


class SmolVLMImagesOnlyProcessor(SmolVLMProcessor):
    """transformers' SmolVLMProcessor for image prompts, without its video parts.

    SmolVLMProcessor cannot be built without a video processor (which needs torchvision) nor without
    `num2words` (used only to spell the frame count of video prompts), even for images. This subclass
    has neither; image prompts go through SmolVLMProcessor's own code unchanged.
    """

    def __init__(self, image_processor: Any, tokenizer: Any, image_seq_len: int = 169,
                 chat_template: str | None = None, **kwargs: Any) -> None:
        # SmolVLMProcessor.__init__ checks for num2words before anything else, so its token
        # attributes are set here as it sets them.
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """The generic template rendering: SmolVLMProcessor's adds video-sampling defaults it reads
        from the video processor."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


@register_family
class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
    model_types = ("smolvlm",)
    model_class = "SmolVLMForConditionalGeneration"
    modalities = "image, multi-image, video"

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """The checkpoint's own processor when torchvision and num2words are installed; otherwise
        SmolVLM's image processing with the PIL image processor and no video part."""
        if is_torchvision_available() and is_num2words_available():
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(source, local_files_only=True)
        return SmolVLMImagesOnlyProcessor.from_pretrained(source, local_files_only=True)

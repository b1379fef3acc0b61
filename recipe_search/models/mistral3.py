"""Mistral 3 (Mistral3ForConditionalGeneration: Mistral Small 3.x and kin): a Pixtral vision tower at
the image's own resolution, a 2x2 patch merger, and a Mistral (or Ministral 3) decoder.

An image of h x w merged patches is written as h rows of w `[IMG]` tokens, each row closed by
`[IMG_BREAK]` and the last one by `[IMG_END]`. Only `[IMG]` tokens carry vision features and may be
pruned; the break and end tokens stay as text. The count varies with the image size, so plans give
each image the fractions of its own count, and one image (all its rows) is one selection unit.

transformers' PixtralProcessor imports its torchvision image processor, so without torchvision it
cannot even be imported; `load_processor` then builds `PixtralImagesProcessor` (below) from the
checkpoint folder: the PIL Pixtral image processor, the tokenizer and the chat template, giving the
same inputs as PixtralProcessor for images and text.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import ModelAdapter, register_family


def _template(value: Any) -> str | None:
    """A chat template as saved: a string, or named templates of which the default one is used."""
    if isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) and value else None


class PixtralImagesProcessor:
    """PixtralProcessor's image-and-text path without torchvision, built from a checkpoint folder.

    PixtralProcessor cannot be imported without torchvision, but nothing it does for images needs it:
    the PIL Pixtral image processor resizes each image (longest edge capped, sides rounded up to
    whole merged patches), normalises and zero-pads to the batch's largest image, and each `[IMG]`
    placeholder in the text becomes that image's rows of `[IMG]` tokens, `[IMG_BREAK]` after each
    row and `[IMG_END]` instead of the last break.
    """

    def __init__(self, tokenizer: Any, image_processor: Any, patch_size: int, spatial_merge_size: int,
                 chat_template: str | None, image_token: str = "[IMG]", image_break_token: str = "[IMG_BREAK]",
                 image_end_token: str = "[IMG_END]") -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.patch_size = int(patch_size)
        self.spatial_merge_size = int(spatial_merge_size)
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token

    @classmethod
    def from_pretrained(cls, source: str) -> "PixtralImagesProcessor":
        """Tokenizer, saved image-processor settings (nested in processor_config.json or in
        preprocessor_config.json: PixtralImageProcessorPil reads both), processor settings and chat
        template of a local folder. Patch and merge sizes missing from the processor settings come
        from the model config, not PixtralProcessor's defaults (16 and 1, wrong for Mistral 3)."""
        from transformers import AutoConfig, AutoTokenizer, PixtralImageProcessorPil
        from transformers.processing_utils import ProcessorMixin

        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        image_processor = PixtralImageProcessorPil.from_pretrained(source, local_files_only=True)
        settings, _ = ProcessorMixin.get_processor_dict(source, local_files_only=True)
        template = _template(settings.get("chat_template")) or _template(getattr(tokenizer, "chat_template", None))
        if template is None:
            raise ValueError(f"{source}: no chat template (chat_template.jinja, chat_template.json or the "
                             "tokenizer's config)")
        patch, merge = settings.get("patch_size"), settings.get("spatial_merge_size")
        if patch is None or merge is None:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
            patch = config.vision_config.patch_size if patch is None else patch
            merge = getattr(config, "spatial_merge_size", 1) if merge is None else merge
        tokens = {k: settings[k] for k in ("image_token", "image_break_token", "image_end_token") if settings.get(k)}
        return cls(tokenizer, image_processor, patch, merge, template, **tokens)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        """The tokenizer's renderer with the checkpoint's template (what ProcessorMixin renders too)."""
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def image_placeholder(self, height: int, width: int) -> str:
        """The text one resized image of height x width pixels stands for in the prompt."""
        side = self.patch_size * self.spatial_merge_size
        rows, cols = height // side, width // side
        if rows < 1 or cols < 1:
            raise ValueError(f"an image of {height}x{width} pixels gives no {side}-pixel merged patch")
        row = self.image_token * cols
        return self.image_break_token.join([row] * rows) + self.image_end_token

    def __call__(self, images: Any = None, text: str | Sequence[str] | None = None, return_tensors: str | None = "pt",
                 padding: bool | str = True, **text_kwargs: Any) -> Any:
        """input_ids and attention_mask of `text` with each `[IMG]` expanded for its image (images in
        the order of the placeholders across the batch; a flat list or one list per prompt), plus the
        padded pixel_values and each image's resized (height, width) as image_sizes."""
        from transformers import BatchFeature
        from transformers.image_utils import make_flat_list_of_images

        if text is None:
            raise ValueError("PixtralImagesProcessor needs text with one [IMG] per image")
        texts = [text] if isinstance(text, str) else list(text)
        flat = make_flat_list_of_images(images) if images is not None else []
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(flat):
            raise ValueError(f"the prompts hold {placeholders} {self.image_token} placeholders for {len(flat)} images")
        data: dict[str, Any] = {}
        if flat:
            # PixtralProcessor too resizes to whole merged patches: patch size times merge size
            pixels = self.image_processor(flat, patch_size=self.patch_size * self.spatial_merge_size,
                                          return_tensors=return_tensors)
            sizes = [(int(h), int(w)) for h, w in pixels["image_sizes"]]
            expanded = iter(self.image_placeholder(h, w) for h, w in sizes)
            texts = ["".join(piece if i == 0 else next(expanded) + piece
                             for i, piece in enumerate(t.split(self.image_token))) for t in texts]
            data.update(pixels)
        encoded = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **text_kwargs)
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)


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
        """The checkpoint's PixtralProcessor when torchvision is there (it imports it), otherwise the
        same inputs from `PixtralImagesProcessor`."""
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return PixtralImagesProcessor.from_pretrained(source)
        return super().load_processor(source)


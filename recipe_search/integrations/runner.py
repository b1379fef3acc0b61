"""A model with a recipe applied, behind a small harness-neutral API.

`PrunedModel` loads any supported family with `recipe_search.models.loading.load_model`, attaches a
recipe with `apply_recipe`, builds inputs with the family adapter (`adapter.inputs`, i.e. the
processor's own chat template, images first, left padding) and generates with the model's own
`generate()`. It imports no harness: `recipe_search.integrations.lmms_eval` wraps it for lmms-eval,
and the same prompts through the same code are what `search-recipe eval` measures.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import torch
from PIL import Image

#: The image placeholder simple (non-chat) lmms-eval tasks may put in their text; the adapter
#: places the images itself, so it is removed from the text.
IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype:
    if value is None or value == "auto":
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={value!r}: expected a floating torch dtype such as float32, bfloat16 or float16")
    return dtype


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def _open_image(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        with Image.open(value) as image:
            return image.convert("RGB")
    raise ValueError(f"unsupported visual of type {type(value).__name__}: only images are supported "
                     "(video and audio are not)")


def images_of(visuals: Iterable[Any] | None) -> list[Image.Image]:
    """A task's visuals (PIL images or image paths) as RGB images."""
    return [_open_image(v) for v in (visuals or [])]


def clean_context(context: str) -> str:
    """A simple task's prompt text without image placeholders (the adapter inserts the images)."""
    return IMAGE_PLACEHOLDER.sub("", context).strip()


def split_messages(messages: Sequence[dict]) -> tuple[list[Image.Image], str]:
    """(images, text) of a one-user-turn chat request, e.g. lmms-eval's `doc_to_messages` output
    `[{"role": "user", "content": [{"type": "image", "url": <PIL or path>}, {"type": "text", "text": ...}]}]`.

    The adapter renders one user turn with the images first, which is how lmms-eval builds the
    messages of a task that defines `doc_to_visual` and `doc_to_text`. Anything else (system or
    assistant turns, several user turns, video, audio) is refused in one line rather than silently
    reshaped."""
    turns = [m for m in messages if m.get("role") != "system" or _content_items(m)]
    if len(turns) != 1 or turns[0].get("role") != "user":
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise ValueError(f"recipe_search model: only one user turn per request is supported, got roles [{roles}]")
    images: list[Image.Image] = []
    texts: list[str] = []
    for item in _content_items(turns[0]):
        kind = item.get("type")
        if kind == "text":
            texts.append(str(item.get("text", "")))
        elif kind == "image":
            images.append(_open_image(item.get("url", item.get("image"))))
        else:
            raise ValueError(f"recipe_search model: content of type {kind!r} is not supported (images and text only)")
    return images, "\n".join(texts)


def _content_items(message: dict) -> list[dict]:
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def first_word(text: str) -> str:
    """The answer normalisation of `search-recipe eval`: the first word, lower case."""
    words = text.strip().split()
    return words[0].lower() if words else ""


def cut_at_stops(text: str, until: Iterable[str] | None) -> str:
    """`text` up to the first occurrence of any stop string (lmms-eval's `until`)."""
    for stop in until or ():
        if stop:
            text = text.split(stop, 1)[0]
    return text


class LogLikelihood(NamedTuple):
    logprob: float  # log P(continuation | prompt), summed over its tokens
    greedy: bool  # whether greedy decoding would produce the continuation
    tokens: int  # tokens in the continuation

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token: what lmms-eval's HF models return (the harness
        picks the multiple-choice answer with the least)."""
        return -self.logprob / max(1, self.tokens)


class PrunedModel:
    """A checkpoint with a pruning recipe attached (or none: the unpruned baseline)."""

    def __init__(self, pretrained: str | os.PathLike, recipe: str | os.PathLike | Any | None = None, *,
                 allow_other_checkpoint: bool = False, device: str | None = None,
                 dtype: str | torch.dtype | None = None, attn_implementation: str = "sdpa",
                 threads: int | None = None) -> None:
        from ..models.loading import load_model
        from ..runtime.apply import apply_recipe

        is_demo = str(pretrained) == "demo"
        # `search-recipe eval` runs the demo on one thread; the same count gives the same sums.
        threads = threads if threads is not None else (1 if is_demo else None)
        if threads:
            torch.set_num_threads(int(threads))
        if is_demo:
            from ..demo import demo_checkpoint

            source: Any = demo_checkpoint()
        else:
            source = Path(str(pretrained)).expanduser() if str(pretrained).startswith(("~", "/", ".")) else pretrained
        self.name = str(pretrained)
        self.device = torch.device(device or "cpu")
        self.dtype = resolve_dtype(dtype)
        model, processor, adapter = load_model(source, attn_implementation=attn_implementation, dtype=self.dtype)
        self.model = model.to(self.device)
        self.processor = processor
        self.adapter = adapter
        self.tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
        self.recipe_path = None if recipe is None or recipe == "" else recipe
        self.handle = (apply_recipe(self.model, recipe, allow_other_checkpoint=allow_other_checkpoint)
                       if self.recipe_path is not None else None)

    # -- inputs ---------------------------------------------------------------------------------
    def inputs(self, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The adapter's batch for one user turn per (images, prompt) pair, on the model's device."""
        if any(len(ims) == 0 for ims in images):
            raise ValueError("recipe_search model: every request needs at least one image (text-only "
                             "requests are not supported by the pruning runtime's input building)")
        batch = self.adapter.inputs(self.processor, [list(ims) for ims in images], list(prompts))
        return {k: self._to_device(v) for k, v in batch.items()}

    def _to_device(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.is_floating_point():
            return value.to(self.device, self.dtype)
        return value.to(self.device)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str], *,
                 max_new_tokens: int = 128, until: Iterable[str] | None = None, temperature: float = 0.0,
                 top_p: float | None = None, num_beams: int = 1, do_sample: bool | None = None) -> list[str]:
        """Generated text per prompt (greedy unless a temperature > 0 asks for sampling), cut at
        the first stop string of `until`."""
        inputs = self.inputs(images, prompts)
        sample = bool(do_sample) if do_sample is not None else float(temperature or 0) > 0
        if sample and not float(temperature or 0) > 0:
            sample = False  # lmms-eval tasks say do_sample with temperature 0: greedy, as its HF models do
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        out = self.model.generate(
            **inputs, max_new_tokens=int(max_new_tokens), do_sample=sample, num_beams=int(num_beams or 1),
            temperature=float(temperature) if sample else None, top_p=top_p if sample else None,
            top_k=None if not sample else self.model.generation_config.top_k,
            pad_token_id=pad, eos_token_id=eos,
        )
        new = out[:, inputs["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [cut_at_stops(t, until) for t in texts]

    # -- scoring --------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, images: Sequence[Image.Image], context: str, continuation: str) -> LogLikelihood:
        """log P(continuation | images, context) and whether greedy decoding would produce it, with
        the recipe applied to the prompt only: the continuation's tokens do not score visual tokens,
        as in a cached generation. The continuation is appended to the rendered prompt as is
        (lmms-eval puts the target delimiter, e.g. a space, at its start)."""
        inputs = self.inputs([images], [context])
        prompt_len = int(inputs["input_ids"].shape[1])
        cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        if cont.shape[1] == 0:
            return LogLikelihood(0.0, True, 0)
        extended = dict(inputs)
        extended["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
        for key, value in inputs.items():
            if key == "input_ids" or not isinstance(value, torch.Tensor) or value.ndim != 2:
                continue
            if value.shape == inputs["input_ids"].shape:  # per-token rows: attention mask, token types
                fill = torch.ones_like(cont) if key == "attention_mask" else torch.zeros_like(cont)
                extended[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
        if self.handle is not None:
            self.handle.prompt_len = prompt_len
        try:
            logits = self.model(**extended, use_cache=False).logits
        finally:
            if self.handle is not None:
                self.handle.prompt_len = None
        n = cont.shape[1]
        # logits at position i predict token i+1; the pruned sequence is shorter, but the text tail
        # (the continuation and the position before it) is never pruned and stays at the end.
        pred = logits[0, -n - 1:-1].float().log_softmax(-1)
        target = cont[0]
        logprob = float(pred.gather(-1, target[:, None]).sum())
        greedy = bool((pred.argmax(-1) == target).all())
        return LogLikelihood(logprob, greedy, n)

    def close(self) -> None:
        """Detach the recipe: the model is exactly as loaded."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

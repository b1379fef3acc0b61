"""The adapter contract: everything the rest of recipe-search may know about a model family.

Calibration, search, recipe and runtime code talk to a model only through a `ModelAdapter`:
where the decoder layers are and how a layer is called, how a layer turns hidden states into
attention scores, which window a layer's mask has, where image and video tokens sit and how they
group into images, how decode positions are formed, the vision tower, and how inputs are built.
Supporting a new family means one adapter module (registered with `register_family`) and one test
module; nothing outside `models/` names a family or a layer attribute.

The default implementation fits the Hugging Face decoder layers of transformers 5 (Llama, Mistral,
Qwen2/3, Gemma 3, Cohere 2 and kin): `layer(hidden_states, attention_mask=..., position_ids=...,
position_embeddings=(cos, sin), ...)` with `self_attn.{q,k}_proj`, optional `q_norm`/`k_norm`,
`scaling`, and the rotary function of the layer's own modeling module.
"""
from __future__ import annotations

import hashlib
import json
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from PIL import Image
from torch import nn

from ..hooks import ModelHook
from ..registry import Registry


@dataclass(frozen=True)
class ModelDims:
    """Language-model sizes that FLOPs formulas need, read from the config (never hard-coded)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_mlp: bool = True  # SwiGLU-style MLP: three d x m matrices instead of two

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Architecture:
    """What must match for a recipe to transfer between two checkpoints."""

    family: str
    model_type: str
    dims: ModelDims
    visual_tokens_per_image: int | None  # None when it varies with the image size

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_type": self.model_type,
            **self.dims.as_dict(),
            "visual_tokens_per_image": self.visual_tokens_per_image,
        }


@dataclass(frozen=True)
class VisionLayout:
    """Where a pre-LLM selection stage can act in the vision tower, and what it costs.

    `feature_index` indexes the tower's hidden-state tuple the LLM reads (0 = embeddings, i =
    output of encoder layer i-1); `has_cls` says whether the tower prepends a CLS token that the
    LLM does not see; `patches` is the number of visual tokens the LLM receives per image.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    feature_index: int
    has_cls: bool
    patches: int
    projector_macs_per_token: int

    @property
    def tokens(self) -> int:
        """Tokens in the tower's sequence (patches plus CLS)."""
        return self.patches + int(self.has_cls)


@dataclass(frozen=True)
class LayerCall:
    """One decoder-layer call in family-neutral terms, every tensor at the call's sequence length.

    `rope` is the (cos, sin) pair the layer rotates with ((B|1, L, dh), or None for a layer
    without rotary embeddings); `position_ids` has the sequence last ((B|1, L), or (k, B, L) for
    multimodal RoPE); `mask` is the layer's own attention mask (None when the backend uses its
    causal kernel).
    """

    hidden: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    position_ids: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass(frozen=True)
class LiveTokens:
    """Which original columns are alive in the running prefill, for hooks that act on visual tokens.

    `cols` (B, Lc) holds each live slot's original column (-1 for slots that only pad a shorter
    row); `visual0` (B, L) is the prompt's visual-token mask before any pruning.
    """

    cols: torch.Tensor
    visual0: torch.Tensor


class ModelAdapter(ABC):
    """Knows where a family keeps its decoder layers, image tokens, sizes, masks and prompt format."""

    family: ClassVar[str] = ""
    #: `model_type` values of the top-level config this adapter handles.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: transformers class that loads a checkpoint of this family.
    model_class: ClassVar[str] = ""
    #: what the README's support table says about the family (image / multi-image / video).
    modalities: ClassVar[str] = "image, multi-image"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- structure -----------------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def decoder_layers(self) -> Sequence[nn.Module]:
        return self.decoder().layers

    def _token_id(self, *names: str) -> int | None:
        for name in names:
            value = getattr(self.config, name, None)
            if value is not None:
                return int(value)
        return None

    @property
    def image_token_id(self) -> int:
        value = self._token_id("image_token_id", "image_token_index")
        if value is None:
            raise ValueError(f"{type(self.model).__name__} config has no image_token_id")
        return value

    @property
    def video_token_id(self) -> int | None:
        """The placeholder id of video frames, for families that take video (None otherwise)."""
        return None

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        """Placeholder ids whose positions carry vision features: what the runtime may prune."""
        video = self.video_token_id
        return (self.image_token_id,) if video is None else (self.image_token_id, video)

    def dims(self) -> ModelDims:
        tc = self.text_config
        heads = int(tc.num_attention_heads)
        hidden = int(tc.hidden_size)
        return ModelDims(
            num_layers=int(tc.num_hidden_layers),
            hidden_size=hidden,
            intermediate_size=int(tc.intermediate_size),
            num_heads=heads,
            num_kv_heads=int(getattr(tc, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(tc, "head_dim", None) or hidden // heads),
        )

    @abstractmethod
    def visual_tokens_per_image(self) -> int | None:
        """Visual tokens one image gives the LLM, or None if it depends on the image."""

    def architecture(self) -> Architecture:
        return Architecture(self.family, str(self.config.model_type), self.dims(), self.visual_tokens_per_image())

    # -- visual tokens -------------------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) True where a token carries vision features (image or video)."""
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.visual_token_ids:
            mask |= input_ids == token
        return mask

    def visual_groups(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) index of the image (or video) each visual token belongs to, -1 elsewhere.

        Default: each maximal run of visual tokens is one image; a run longer than the fixed
        per-image count (two images written back to back) is cut into images of that count.
        Families that interleave text inside one image (row separators) override this.
        """
        visual = self.visual_mask(input_ids)
        starts = visual & ~torch.nn.functional.pad(visual, (1, 0))[:, :-1]
        per_image = self.visual_tokens_per_image()
        if per_image:
            run_start_pos = torch.where(starts, torch.arange(visual.shape[1], device=visual.device), 0)
            run_start_pos = torch.cummax(run_start_pos, dim=1).values
            offset = torch.arange(visual.shape[1], device=visual.device) - run_start_pos
            starts = starts | (visual & (offset % per_image == 0))
        group = torch.cumsum(starts.long(), dim=1) - 1
        return torch.where(visual, group, torch.full_like(group, -1))

    # -- decoder-layer calls -------------------------------------------------------------------
    def read_layer_call(self, args: tuple, kwargs: dict) -> LayerCall:
        """The family-neutral view of the arguments a decoder layer was called with."""
        hidden = args[0] if args else kwargs["hidden_states"]
        return LayerCall(hidden, kwargs.get("position_embeddings"), kwargs.get("position_ids"),
                         kwargs.get("attention_mask"))

    def write_layer_call(self, args: tuple, kwargs: dict, call: LayerCall) -> tuple[tuple, dict]:
        """`args, kwargs` with the fields of `call` put back where the layer reads them."""
        args, kwargs = self.with_hidden(args, dict(kwargs), call.hidden)
        if call.rope is not None:
            kwargs["position_embeddings"] = call.rope
        if call.position_ids is not None:
            kwargs["position_ids"] = call.position_ids
        if "attention_mask" in kwargs or call.mask is not None:
            kwargs["attention_mask"] = call.mask
        return args, kwargs

    def with_hidden(self, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """`args, kwargs` of a layer call with its input hidden states replaced."""
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def layer_window(self, idx: int) -> int | None:
        """Sliding-window size of decoder layer `idx` (None: full attention)."""
        tc = self.text_config
        window = getattr(tc, "sliding_window", None)
        if not window:
            return None
        types = getattr(tc, "layer_types", None)
        if types is not None:
            return int(window) if types[idx] == "sliding_attention" else None
        return int(window) if getattr(tc, "use_sliding_window", True) else None

    def prefill_hooks(self, live: Callable[[], LiveTokens | None]) -> list[tuple[nn.Module, ModelHook]]:
        """Extra hooks a pruned prefill needs for this family (e.g. features injected between
        layers at visual positions); `live()` tells where the visual tokens are now."""
        return []

    # -- attention scoring ---------------------------------------------------------------------
    def rotary(self, layer: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        """The rotary function the layer's attention applies: its own modeling module's."""
        return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb

    def attention_input(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """What the layer feeds its attention projections (its pre-attention norm of `hidden`)."""
        return layer.input_layernorm(hidden)

    def query_key(self, layer: nn.Module, hidden: torch.Tensor,
                  rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, H, L, dh) and keys (B, H, L, dh), KV heads repeated to H, exactly as the
        layer's attention forms them (projection, q/k norms, rotary); `rope` is the layer's own
        (cos, sin) gathered to the live tokens. Recomputing them lets rules read the few attention
        rows they need while the model keeps its fast SDPA kernel."""
        attn = layer.self_attn
        x = self.attention_input(layer, hidden)
        bsz, length, _ = x.shape
        q = attn.q_proj(x).view(bsz, length, -1, attn.head_dim)
        k = attn.k_proj(x).view(bsz, length, -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None:
            q, k = self.rotary(layer)(q, k, *rope)
        groups = q.shape[1] // k.shape[1]
        return q, k.repeat_interleave(groups, dim=1) if groups > 1 else k

    def key_norms(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L) squared L2 norm of each token's key, summed over the heads of `query_key`'s keys (KV
        heads repeated), without computing queries or rotary: a rotation keeps the norm, so a rule
        that reads only key sizes (DART's pivots) costs one projection instead of two."""
        attn = layer.self_attn
        x = self.attention_input(layer, hidden)
        k = attn.k_proj(x).view(x.shape[0], x.shape[1], -1, attn.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            k = attn.k_norm(k)
        groups = attn.q_proj.out_features // attn.head_dim // k.shape[2]
        return k.float().square().sum(dim=(2, 3)) * groups

    def attention_logits(self, layer: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits (B, H, R, L) in float32 from query rows and keys, scaled (and
        soft-capped) as the layer does before its mask is added."""
        attn = layer.self_attn
        logits = (q.float() @ k.float().transpose(-1, -2)) * float(attn.scaling)
        cap = getattr(attn, "attn_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output (B, q, d): final norm, then the LM head."""
        logits = self.model.get_output_embeddings()(self.decoder().norm(hidden))
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    # -- decoding ------------------------------------------------------------------------------
    def decode_position_ids(self, text_positions: torch.Tensor) -> torch.Tensor:
        """Family-format position ids for continuation tokens given their 1-D text positions (B, q)."""
        return text_positions

    # -- vision tower (pre-LLM selection stage) ------------------------------------------------
    def _no_vision_stage(self) -> ValueError:
        return ValueError(f"vision-side selection rules are not supported for the {self.family} family; "
                          "use an LLM-side rule")

    def vision_layout(self) -> VisionLayout:
        raise self._no_vision_stage()

    def vision_layers(self) -> Sequence[nn.Module]:
        raise self._no_vision_stage()

    def projector(self) -> nn.Module:
        raise self._no_vision_stage()

    def vision_hidden(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The input hidden states of a vision encoder layer call."""
        return args[0] if args else kwargs["hidden_states"]

    def vision_query_key(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries and keys (B, H, n, dh) of a vision encoder layer, and its scale."""
        raise self._no_vision_stage()

    # -- inputs --------------------------------------------------------------------------------
    def context_length(self) -> int | None:
        """Longest sequence the language model was built for (None when the config does not say)."""
        value = getattr(self.text_config, "max_position_embeddings", None)
        return int(value) if value else None

    def inputs(self, processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """`build_inputs`, refused in one line when a prompt is longer than the model's context
        (a long prompt would otherwise run for minutes and answer from positions never trained)."""
        batch = self.build_inputs(processor, images, prompts)
        limit, length = self.context_length(), int(batch["input_ids"].shape[1])
        if limit is not None and length > limit:
            raise ValueError(f"a prompt is {length} tokens with its images, longer than the model's context of "
                             f"{limit} tokens; shorten it")
        return self.to_model(batch)

    def to_model(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Inputs on the device of the model's embeddings, floating ones in the model's dtype (a
        processor returns float32 CPU tensors whatever the model runs in)."""
        weight = self.model.get_input_embeddings().weight
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        dtype = self.model.dtype
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    @classmethod
    def load_processor(cls, source: str) -> Any:
        """The checkpoint's processor, built without torchvision where the family allows it."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, local_files_only=True)

    def build_inputs(
        self, processor: Any, images: Sequence[Image.Image | Sequence[Image.Image]], prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Tokenised, left-padded model inputs for one user turn per (images, prompt) pair, through
        the processor's own chat template. An entry of `images` is one image or a list of them.

        A template that writes `bos_token` itself (Gemma 3, Aya Vision, Mistral) gets no second
        BOS from the tokenizer, as in transformers' own chat path."""
        processor.tokenizer.padding_side = "left"
        per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        texts = [chat_prompt(processor, p, len(ims)) for p, ims in zip(prompts, per_prompt)]
        bos = processor.tokenizer.bos_token
        templated_bos = {"add_special_tokens": False} if bos and all(t.startswith(bos) for t in texts) else {}
        batch = processor(images=self.processor_images(per_prompt), text=texts, return_tensors="pt", padding=True,
                          **templated_bos)
        return dict(batch)

    def processor_images(self, per_prompt: list[list[Image.Image]]) -> Any:
        """How this family's processor wants the images: a flat list by default."""
        return [im for ims in per_prompt for im in ims]

    def fingerprint(self) -> str:
        """Identity of this checkpoint: architecture plus a strided sample of every weight.

        Hashing every byte of a 7B model takes minutes; a few thousand values per tensor tell two
        checkpoints apart just as well for the purpose of matching a recipe to its model.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self.architecture().as_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to(torch.float32).cpu().numpy()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.round(6).tobytes())
        return digest.hexdigest()[:16]


def pil_processor(source: str, processor_class: Any, image_processor_class: Any) -> Any:
    """`processor_class` built from a checkpoint folder with a PIL image processor, so no
    torchvision is needed (AutoProcessor would pick a torchvision-backed one)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    image_processor = image_processor_class.from_pretrained(source, local_files_only=True)
    processor_dict, _ = processor_class.get_processor_dict(source, local_files_only=True)
    return processor_class.from_args_and_dict([image_processor, tokenizer], processor_dict)


def chat_prompt(processor: Any, question: str, images: int = 1) -> str:
    """One user turn with `images` images and a question, rendered by the processor's own template."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class UnsupportedModelError(ValueError):
    pass


_FAMILIES: Registry[type[ModelAdapter]] = Registry("model type")


def register_family(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make `adapter` the one handler of its `model_types` (duplicates refused)."""
    if not adapter.family or not adapter.model_types or not adapter.model_class:
        raise ValueError(f"{adapter.__name__} must set family, model_types and model_class")
    for model_type in adapter.model_types:
        if model_type in _FAMILIES:
            raise ValueError(f"model type {model_type!r} is already handled by {_FAMILIES[model_type].__name__}")
    for model_type in adapter.model_types:
        _FAMILIES.register(model_type, adapter)
    return adapter


def families() -> dict[str, type[ModelAdapter]]:
    """model_type -> adapter class, in registration order."""
    return dict(_FAMILIES.items())


def supported_model_types() -> list[str]:
    return _FAMILIES.names()


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class for `model_type`, or a one-line error naming the supported ones."""
    if model_type not in _FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model type {model_type!r}; supported: {', '.join(supported_model_types())}")
    return _FAMILIES[model_type]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, or a one-line error naming the supported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_class(model_type)(model)


__all__ = ["Architecture", "LayerCall", "LiveTokens", "ModelAdapter", "ModelDims", "UnsupportedModelError",
           "VisionLayout", "adapter_class", "chat_prompt", "families", "get_adapter", "register_family",
           "supported_model_types"]

"""The adapter contract: everything the rest of recipe-search may know about a model family.

Calibration, search, recipe and runtime code talk to a model only through a `ModelAdapter`, so
supporting a new family means writing one adapter and nothing else.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


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
    visual_tokens_per_image: int | None  # None when it varies with the image size (Qwen2-VL)

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


class ModelAdapter(ABC):
    """Knows where a family keeps its decoder layers, image tokens, sizes and prompt format."""

    family: str = ""
    #: `model_type` values of the top-level config this adapter handles.
    model_types: tuple[str, ...] = ()

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

    @property
    def image_token_id(self) -> int:
        value = getattr(self.config, "image_token_id", None)
        if value is None:
            value = getattr(self.config, "image_token_index", None)
        if value is None:
            raise ValueError(f"{type(self.model).__name__} config has no image_token_id")
        return int(value)

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

    # -- attention scoring ---------------------------------------------------------------------
    def query_key(
        self, layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary-embedded queries (B, H, L, dh) and keys (B, H, L, dh), KV heads repeated to H.

        This is what a Llama-style layer's attention computes internally (Llama, Qwen2 and their
        kin); recomputing it lets selection rules read the few attention rows they need while the
        model keeps its fast SDPA kernel. Families with another attention layout override it.
        """
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        bsz, length, _ = x.shape
        q = attn.q_proj(x).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, repeat_kv(k, attn.num_key_value_groups)

    # -- vision tower (pre-LLM selection stage) ------------------------------------------------
    def vision_layout(self) -> VisionLayout:
        raise ValueError(f"vision-side selection is not supported for the {self.family} family")

    def vision_layers(self) -> Sequence[nn.Module]:
        raise ValueError(f"vision-side selection is not supported for the {self.family} family")

    def projector(self) -> nn.Module:
        raise ValueError(f"vision-side selection is not supported for the {self.family} family")

    @staticmethod
    def vision_query_key(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries and keys (B, H, n, dh) of a ViT encoder layer (CLIP/SigLIP layout), and its scale."""
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        bsz, length, _ = x.shape
        q = attn.q_proj(x).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, length, -1, attn.head_dim).transpose(1, 2)
        return q, k, float(attn.scale)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last decoder layer's output (B, q, d): final norm, then the LM head."""
        return self.model.get_output_embeddings()(self.decoder().norm(hidden))

    # -- inputs --------------------------------------------------------------------------------
    def build_inputs(
        self, processor: Any, images: Sequence[Image.Image], prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Tokenised, left-padded model inputs for one user turn per (image, prompt) pair, through
        the processor's own chat template (families whose processor differs override this)."""
        processor.tokenizer.padding_side = "left"
        texts = [chat_prompt(processor, p) for p in prompts]
        batch = processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        return dict(batch)

    def decode_position_ids(self, text_positions: torch.Tensor) -> torch.Tensor:
        """Family-format position ids for continuation tokens given their 1-D text positions (B, q)."""
        return text_positions

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


def chat_prompt(processor: Any, question: str) -> str:
    """One user turn with an image and a question, rendered by the processor's own chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

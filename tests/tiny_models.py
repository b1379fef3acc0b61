"""Tiny random-weight models of the supported families, built offline for tests."""
from __future__ import annotations

import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

IMAGE_TOKEN = 5
VOCAB = 64


def tiny_llava(attn: str = "sdpa", seed: int = 0, layers: int = 6, tower: str = "clip") -> LlavaForConditionalGeneration:
    """CLIP (32 px, patch 4 -> 64 visual tokens, CLS dropped) + Llama h64 with GQA (4 heads, 2 KV heads).

    tower="siglip": a 3-layer SigLIP tower without CLS instead (all 64 patches reach the LLM).
    """
    torch.manual_seed(seed)
    if tower == "siglip":
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                    image_size=32, patch_size=4)
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=4, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1,
                         vision_feature_select_strategy="full" if tower == "siglip" else "default")
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A seeded RGB noise image of `size` (width, height)."""
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=gen) * 255).byte().numpy())


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask with every row padded on the left (pad id 0) to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def llava_inputs(batch_prompts: list[list[int]], seed: int = 0, n_image: int = 64) -> dict[str, torch.Tensor]:
    """Left-padded inputs: each prompt is [bos, *prefix, <image> x n, *suffix] given as text ids."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[1, 7, 8] + [IMAGE_TOKEN] * n_image + p for p in batch_prompts]
    ids, mask = left_pad(rows)
    pixels = torch.randn(len(rows), 3, 32, 32, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def multi_image_inputs(rows: list[tuple[int, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded LLaVA inputs with several images per prompt: a row (n, suffix) is
    [bos, 7, 8] + n x (64 image tokens, 20) + suffix."""
    gen = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([[1, 7, 8] + ([IMAGE_TOKEN] * 64 + [20]) * n + suffix for n, suffix in rows])
    pixels = torch.randn(sum(n for n, _ in rows), 3, 32, 32, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=6, vision_start_token_id=9, vision_end_token_id=10,
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def qwen_inputs(batch_prompts: list[list[int]], grid: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-free Qwen2-VL inputs: <|vision_start|> + (grid/2)^2 image pads + <|vision_end|>."""
    gen = torch.Generator().manual_seed(seed)
    n_image = (grid // 2) ** 2
    rows = [[1, 9] + [IMAGE_TOKEN] * n_image + [10] + p for p in batch_prompts]
    ids, mask = left_pad(rows)
    patches = torch.randn(len(rows) * grid * grid, 3 * 2 * 4 * 4, generator=gen)
    thw = torch.tensor([[1, grid, grid]] * len(rows))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": patches, "image_grid_thw": thw,
            "mm_token_type_ids": (ids == IMAGE_TOKEN).long()}

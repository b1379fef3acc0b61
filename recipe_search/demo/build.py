"""Construction of the demo model's tokenizer, processor and (untrained) model.

Kept apart from the training script so that tests and the evaluation code can rebuild exactly
the same objects, and so that the token layout used in training is checked against the
processor the product uses.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from recipe_search.demo import world

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, IMAGE)
ROLE_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", ":")
NUM_VISUAL_TOKENS = world.GRID * world.GRID  # 144, CLS dropped by the "default" strategy

# "USER: <image>\n{question}\nASSISTANT: {answer}</s>\n..." -- the generation prompt ends on ":",
# the position whose logits give the answer word.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set items = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set items = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- for item in items -%}{%- if item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] + '\\n' -}}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{- 'ASSISTANT: ' -}}{%- for item in items -%}{{- item['text'] -}}{%- endfor -%}{{- '</s>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def word_level(words: list[str], unk: str) -> tuple[Tokenizer, dict[str, int]]:
    """A tokenizer with one token per word (ids in the order given), split on whitespace, decoded
    with spaces between words; and its vocabulary. The synthetic worlds' answers are single words."""
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return tok, vocab


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: every world word is one token, so answers are single tokens."""
    tok, vocab = word_level([*SPECIAL_TOKENS, *ROLE_WORDS, *world.vocabulary()], UNK)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=512,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": world.IMAGE_SIZE},
        crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=world.CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default"
        chat_template=CHAT_TEMPLATE,
    )


#: decoder families the demo world can be trained on: the shipped Llama, or Qwen2 (biased q/k/v projections,
#: its own layer code), which measures the search on a backbone unlike the demo's (docs/demo-model.md)
BACKBONES = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def build_config(tokenizer: PreTrainedTokenizerFast, layers: int = 8, backbone: str = "llama") -> LlavaConfig:
    """The demo's architecture; `layers` decoder layers (8 ships; deeper ones measure what depth changes)
    and the `backbone` decoder family (Llama ships)."""
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=world.IMAGE_SIZE,
        patch_size=world.CELL,
        projection_dim=64,
    )
    text = BACKBONES[backbone](
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=NUM_VISUAL_TOKENS,
        tie_word_embeddings=True,
    )


def build_model(tokenizer: PreTrainedTokenizerFast, layers: int = 8,
                backbone: str = "llama") -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration(build_config(tokenizer, layers, backbone))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model

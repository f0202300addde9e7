"""Offline tiny Qwen2.5-VL / Qwen2-VL models for tests and the default demo.

`build_tiny(dir, variant)` writes a directory that loads exactly like a hub checkpoint
(``AutoProcessor.from_pretrained(dir)`` + ``AutoModelForImageTextToText.from_pretrained(dir)``):
config.json + safetensors weights (random, seeded), a BPE tokenizer trained here on a small
corpus with the Qwen special tokens, the image-processor config and a Qwen-style chat template.

Shapes follow REFERENCE §7: hidden 128 with head_dim 64 (vLLM's CPU attention kernel rejects 16),
``mrope_section`` summing to head_dim/2, 2 decoder layers, vision depth 2. The ``lam`` variant
uses the Qwen2-VL architecture, standing in for UI-TARS / OS-Atlas (Qwen2-VL based LAMs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

VARIANTS = ("vlm", "lam")

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template (system → user content with images in order → assistant), trimmed of tools.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small corpus so the BPE learns game/prompt words and every single letter (action labels).
_CORPUS = [
    "You are playing an Atari game. Choose the next action.",
    "Answer with the letter of one action: A NOOP B FIRE C RIGHT D LEFT E UP F DOWN",
    "Look at the frames, analyse the objects, the space and the threats step by step, then act.",
    "Commit to the next action and justify it briefly.",
    "The ball moves toward the paddle. Move up to hit it. Move down. Fire. Stay.",
    "system user assistant helpful assistant Pong Breakout Space Invaders score lives enemy",
    " ".join("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"),
]


@dataclass
class TinyConfig:
    """Shapes of a tiny model; defaults are what tests and the demo use."""

    hidden_size: int = 128
    """Decoder width; with 2 heads this gives head_dim 64."""
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    num_hidden_layers: int = 2
    intermediate_size: int = 256
    vision_depth: int = 2
    """Vision transformer blocks."""
    vision_hidden_size: int = 64
    vision_heads: int = 2
    vocab_size: int = 512
    """BPE vocabulary trained locally (special tokens included)."""
    seed: int = 0
    """Seeds weights; the same seed gives byte-identical safetensors."""
    init_std: float = 0.02
    """Std of the random weights (transformers' ``initializer_range``). At 0.02 (a model about to be
    trained) attention logits are ~0.05, so every token attends almost uniformly: the last token of
    two prompts on the same frames averages the same image tokens and the prompts' pooled states
    correlate at r ≈ 0.997. At 0.12 (the synthetic participant's model) attention is content-dependent,
    as in a trained model, and the prompt changes what the last token reads from the image."""


def _train_tokenizer(cfg: TinyConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _model_config(cfg: TinyConfig, variant: str, tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # mrope splits the rotary half-dimension into (temporal, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        initializer_range=cfg.init_std,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, initializer_range=cfg.init_std,  # the top-level value initialises every module
    )
    if variant == "vlm":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_heads,
                      intermediate_size=cfg.vision_hidden_size * 2, out_hidden_size=cfg.hidden_size,
                      fullatt_block_indexes=[cfg.vision_depth - 1], window_size=112)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    from transformers import Qwen2VLConfig

    vision = dict(depth=cfg.vision_depth, embed_dim=cfg.vision_hidden_size, hidden_size=cfg.hidden_size,
                  num_heads=cfg.vision_heads, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **common)


def build_tiny(out_dir: str | Path, variant: str = "vlm", cfg: TinyConfig | None = None) -> Path:
    """Write a tiny model directory; returns its path. Deterministic for a given ``cfg.seed``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {VARIANTS}")
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = cfg or TinyConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(cfg)
    config = _model_config(cfg, variant, tokenizer)
    torch.manual_seed(cfg.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Frames are 210×160: keep the processor's pixel range so one frame is a few dozen tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=256 * 28 * 28)
    image_processor.save_pretrained(out)
    proc_cls = "Qwen2_5_VLProcessor" if variant == "vlm" else "Qwen2VLProcessor"
    (out / "processor_config.json").write_text(json.dumps({"processor_class": proc_cls}, indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "neuroarcade_tiny.json").write_text(json.dumps({"variant": variant, **cfg.__dict__}, indent=2))
    return out

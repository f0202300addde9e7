"""Offline tiny VLMs of every supported family, for tests, benchmarks and the default demo.

``build_tiny(dir, family)`` writes a directory that loads exactly like a hub checkpoint of that family
(``agents.families.load_processor(dir)`` / ``AutoProcessor`` + ``AutoModelForImageTextToText.from_pretrained(dir)``):
config.json + safetensors weights (random, seeded), a BPE tokenizer trained here on a small corpus with the
family's special tokens, the family's own image-processor and processor configs, and a chat template in the
family's style (images in the user turn, in order).

Families are transformers ``model_type`` names (:data:`FAMILIES`); ``vlm`` and ``lam`` stay as aliases of
``qwen2_5_vl`` and ``qwen2_vl`` (the LAMs UI-TARS / OS-Atlas are Qwen2-VL models).

Shapes follow REFERENCE §7: text hidden 128 with head_dim 64 (vLLM's CPU attention kernel rejects 16),
2 decoder layers, 2 vision blocks; Qwen's ``mrope_section`` sums to head_dim/2. Image sizes are chosen so a
210×160 Atari frame gives a few dozen image tokens (Qwen: 48; the fixed-resolution families 16 per tile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "internvl", "llava_onevision", "idefics3", "gemma3")
"""Families a tiny model can be built for (transformers model_type names)."""
ALIASES = {"vlm": "qwen2_5_vl", "lam": "qwen2_vl"}
"""The historical ``--variant`` names."""
VARIANTS = tuple(ALIASES)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
"""Qwen special tokens (the other families' are in :data:`_RECIPES`)."""

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


def _chatml(image: str) -> str:
    """ChatML (InternVL3-hf, LLaVA-OneVision on Qwen2): each image part rendered as ``image``."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Idefics3 / SmolVLM style: "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Gemma 3 style: no system role (its text opens the first user turn), images as <start_of_image>.
GEMMA3_TEMPLATE = (
    "<bos>{% set first = namespace(prefix='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{% set first.prefix = message['content'] + '\n\n' %}"
    "{% else %}{% set first.prefix = message['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% else %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ first.prefix }}{% set first.prefix = '' %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
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
    """Decoder attention heads."""
    num_key_value_heads: int = 1
    """Decoder key/value heads (grouped-query attention)."""
    num_hidden_layers: int = 2
    """Decoder layers (hidden-state entries: this + 1)."""
    intermediate_size: int = 256
    """Decoder MLP width."""
    vision_depth: int = 2
    """Vision transformer blocks."""
    vision_hidden_size: int = 64
    """Vision transformer width."""
    vision_heads: int = 2
    """Vision attention heads."""
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


@dataclass(frozen=True)
class _Recipe:
    """What a family's tiny tokenizer needs: its special tokens and the attributes processors read."""

    special_tokens: tuple[str, ...]
    """Added as special tokens (the first is the pad token)."""
    eos: str
    """End-of-turn token."""
    named: dict
    """Tokenizer attribute → special token (e.g. InternVL's ``context_image_token``)."""
    chat_template: str
    """Jinja chat template in the family's style."""


_ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_RECIPES = {
    "qwen2_5_vl": _Recipe(tuple(SPECIAL_TOKENS), "<|im_end|>", {}, CHAT_TEMPLATE),
    "qwen2_vl": _Recipe(tuple(SPECIAL_TOKENS), "<|im_end|>", {}, CHAT_TEMPLATE),
    "internvl": _Recipe(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"), "<|im_end|>",
        {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
         "video_token": "<video>"}, _chatml("<IMG_CONTEXT>\n")),
    "llava_onevision": _Recipe(
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"), "<|im_end|>",
        {"image_token": "<image>", "video_token": "<video>"}, _chatml("<image>\n")),
    "idefics3": _Recipe(
        ("<|end_of_text|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
         "<global-img>", *_ROW_COL), "<end_of_utterance>", {}, IDEFICS3_TEMPLATE),
    "gemma3": _Recipe(
        ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
         "<image_soft_token>"), "<end_of_turn>",
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        GEMMA3_TEMPLATE),
}


def resolve_family(name: str) -> str:
    """``vlm``/``lam`` → their family; a family name as is; anything else raises ValueError."""
    family = ALIASES.get(name, name)
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {name!r}; choose one of {', '.join(FAMILIES)} "
                         f"(or the aliases {', '.join(f'{k}={v}' for k, v in ALIASES.items())})")
    return family


def _train_tokenizer(cfg: TinyConfig, family: str = "qwen2_5_vl"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    recipe = _RECIPES[family]
    special = list(recipe.special_tokens)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    extra = {"extra_special_tokens": dict(recipe.named)} if recipe.named else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=recipe.eos, pad_token=special[0],
        additional_special_tokens=[t for t in special[1:] if t not in recipe.named.values()], **extra,
    )
    if family == "gemma3":
        from tokenizers import AddedToken

        fast.bos_token = "<bos>"
        # Gemma's vocabulary has runs of newlines as tokens; vLLM's Gemma 3 processor looks them up by text.
        fast.add_tokens([AddedToken("\n" * n, normalized=False, special=False) for n in (1, 2, 3, 4)])
    fast.chat_template = recipe.chat_template
    return fast


def _text_config(cfg: TinyConfig, tokenizer, **extra) -> dict:
    """Decoder settings shared by every family (head_dim 64)."""
    pad = tokenizer.pad_token_id
    return dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=4096,
                head_dim=cfg.hidden_size // cfg.num_attention_heads, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad, bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad,
                initializer_range=cfg.init_std, **extra)


def _vision(cfg: TinyConfig, **extra) -> dict:
    return dict(hidden_size=cfg.vision_hidden_size, num_hidden_layers=cfg.vision_depth,
                num_attention_heads=cfg.vision_heads, intermediate_size=cfg.vision_hidden_size * 2,
                initializer_range=cfg.init_std, **extra)


def _qwen_config(cfg: TinyConfig, family: str, tokenizer):
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
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=cfg.vision_heads,
                      intermediate_size=cfg.vision_hidden_size * 2, out_hidden_size=cfg.hidden_size,
                      fullatt_block_indexes=[cfg.vision_depth - 1], window_size=112)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    from transformers import Qwen2VLConfig

    vision = dict(depth=cfg.vision_depth, embed_dim=cfg.vision_hidden_size, hidden_size=cfg.hidden_size,
                  num_heads=cfg.vision_heads, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **common)


_VIDEO_PROCESSORS = {"internvl": "InternVLVideoProcessor", "llava_onevision": "LlavaOnevisionVideoProcessor"}
"""Families whose hub processor also loads a video processor (torchvision-only in transformers 5)."""

_SIGLIP_TOWER = ("llava_onevision", "gemma3")
"""Families with a SigLIP vision tower, whose hub checkpoints name it ``vision_tower.vision_model.*``."""


def _hub_vision_keys(path: Path) -> None:
    """Rename ``vision_tower.*`` weights to the hub layout ``vision_tower.vision_model.*``.

    transformers 5.24 saves the SigLIP tower without its ``vision_model`` level (and reads both); vLLM
    reads only the hub layout ("no module or parameter named 'vision_tower.embeddings'").
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({("vision_tower.vision_model." + k[len("vision_tower."):]
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}, path, metadata={"format": "pt"})


# Fixed-resolution families: tile side and patch size → 16 image tokens per tile after their 2×2 merge.
_TILE, _PATCH = 112, 14


def _config_and_processor(cfg: TinyConfig, family: str, tokenizer):
    """(model config, processor) of a non-Qwen family, built from its own transformers classes."""
    from agents.families import image_only_processor

    tid = tokenizer.convert_tokens_to_ids
    if family == "internvl":
        from transformers import InternVLConfig, InternVLProcessor, Qwen2Config
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        config = InternVLConfig(
            text_config=Qwen2Config(**_text_config(cfg, tokenizer)).to_dict(),
            vision_config=_vision(cfg, image_size=[_TILE, _TILE], patch_size=[_PATCH, _PATCH]),
            image_token_id=tid("<IMG_CONTEXT>"), image_seq_length=16, downsample_ratio=0.5,
            tie_word_embeddings=False, initializer_range=cfg.init_std)
        # One tile per frame (InternVL3's dynamic tiling would make 13 tiles of a 210×160 frame).
        ip = GotOcr2ImageProcessorPil(size={"height": _TILE, "width": _TILE}, crop_to_patches=False, max_patches=1)
        proc = image_only_processor(InternVLProcessor)(image_processor=ip, tokenizer=tokenizer, image_seq_length=16,
                                                       chat_template=tokenizer.chat_template)
    elif family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor, Qwen2Config
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        side = 56  # 4×4 patches of 14: 16 tokens per tile; any-resolution tiles on a 56-pixel grid
        pinpoints = [[side * a, side * b] for a in (1, 2) for b in (1, 2)]
        config = LlavaOnevisionConfig(
            text_config=Qwen2Config(**_text_config(cfg, tokenizer)).to_dict(),
            vision_config=dict(model_type="siglip_vision_model", image_size=side, patch_size=_PATCH,
                               **_vision(cfg)),
            image_token_index=tid("<image>"), video_token_index=tid("<video>"), image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
            initializer_range=cfg.init_std)
        ip = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
        proc = image_only_processor(LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=tokenizer.chat_template)
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3Processor, LlamaConfig
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        side, patch = 128, 16  # 8×8 patches, pixel-shuffled 2×2: 16 tokens
        config = Idefics3Config(
            text_config=LlamaConfig(**_text_config(cfg, tokenizer)).to_dict(),
            vision_config=_vision(cfg, image_size=side, patch_size=patch),
            image_token_id=tid("<image>"), scale_factor=2, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, initializer_range=cfg.init_std)
        ip = Idefics3ImageProcessorPil(size={"longest_edge": side}, max_image_size={"longest_edge": side},
                                       do_image_splitting=False)
        proc = Idefics3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_len=16,
                                 chat_template=tokenizer.chat_template)
    elif family == "gemma3":
        from transformers import Gemma3Config, Gemma3Processor, Gemma3TextConfig
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        side, patch = 128, 16  # 8×8 patches, average-pooled to 4×4: 16 tokens
        text = Gemma3TextConfig(**_text_config(cfg, tokenizer, query_pre_attn_scalar=64, sliding_window=512))
        config = Gemma3Config(
            text_config=text.to_dict(),
            vision_config=dict(model_type="siglip_vision_model", image_size=side, patch_size=patch, **_vision(cfg)),
            mm_tokens_per_image=16, boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
            image_token_index=tid("<image_soft_token>"), tie_word_embeddings=False, initializer_range=cfg.init_std)
        ip = Gemma3ImageProcessorPil(size={"height": side, "width": side}, do_pan_and_scan=False)
        proc = Gemma3Processor(image_processor=ip, tokenizer=tokenizer, image_seq_length=16,
                               chat_template=tokenizer.chat_template)
    else:
        raise ValueError(f"no tiny recipe for family {family!r}")
    return config, proc


def build_tiny(out_dir: str | Path, family: str = "qwen2_5_vl", cfg: TinyConfig | None = None) -> Path:
    """Write a tiny model directory of ``family`` (or the aliases vlm/lam); returns its path.

    Deterministic for a given ``cfg.seed``.
    """
    family = resolve_family(family)
    import torch
    from transformers import AutoModelForImageTextToText

    cfg = cfg or TinyConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(cfg, family)
    if family in ("qwen2_5_vl", "qwen2_vl"):
        config, processor = _qwen_config(cfg, family, tokenizer), None
    else:
        config, processor = _config_and_processor(cfg, family, tokenizer)
    torch.manual_seed(cfg.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    if family in _SIGLIP_TOWER:
        _hub_vision_keys(out / "model.safetensors")
    if processor is not None:  # tokenizer, image processor, processor config and chat template
        processor.save_pretrained(out)
        if family in _VIDEO_PROCESSORS:
            # A hub checkpoint ships its video processor's config; vLLM's processor loads it (torchvision there),
            # our agent never feeds video and loads the processor without it (families.image_only_processor).
            side = getattr(config.vision_config, "image_size", _TILE)
            side = side[0] if isinstance(side, (list, tuple)) else side
            (out / "video_preprocessor_config.json").write_text(json.dumps(
                {"video_processor_type": _VIDEO_PROCESSORS[family], "size": {"height": side, "width": side}},
                indent=2))
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer.save_pretrained(out)
        # Frames are 210×160: keep the processor's pixel range so one frame is a few dozen tokens.
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=256 * 28 * 28)
        image_processor.save_pretrained(out)
        proc_cls = "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen2VLProcessor"
        (out / "processor_config.json").write_text(json.dumps({"processor_class": proc_cls}, indent=2))
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    variant = {v: k for k, v in ALIASES.items()}.get(family, family)
    (out / "neuroarcade_tiny.json").write_text(json.dumps({"family": family, "variant": variant, **cfg.__dict__},
                                                          indent=2))
    return out

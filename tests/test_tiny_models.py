"""The offline tiny models load through the hub code path and are reproducible."""

from __future__ import annotations

import hashlib
import json

import pytest

from agents.tiny import build_tiny


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("variant,arch", [("vlm", "Qwen2_5_VLForConditionalGeneration"),
                                          ("lam", "Qwen2VLForConditionalGeneration")])
def test_build_tiny_loads_like_a_hub_model(tmp_path, variant, arch):
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    torch.set_num_threads(1)
    a = build_tiny(tmp_path / "a", variant)
    b = build_tiny(tmp_path / "b", variant)
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")  # seeded: byte-identical weights
    assert _sha(a / "tokenizer.json") == _sha(b / "tokenizer.json")

    model = AutoModelForImageTextToText.from_pretrained(a)
    assert type(model).__name__ == arch
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert head_dim == 64  # vLLM's CPU attention kernel rejects 16
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2

    tok = AutoTokenizer.from_pretrained(a)
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert tok.chat_template and "<|vision_start|><|image_pad|><|vision_end|>" in tok.chat_template

    image_processor = AutoImageProcessor.from_pretrained(a)
    import numpy as np

    vis = image_processor(images=[np.zeros((210, 160, 3), np.uint8)], return_tensors="pt")
    assert int(vis["image_grid_thw"][0].prod()) // image_processor.merge_size ** 2 == 48  # REFERENCE §7
    assert json.loads((a / "neuroarcade_tiny.json").read_text())["variant"] == variant


@pytest.mark.slow
@pytest.mark.parametrize("family,arch,processor", [
    ("internvl", "InternVLForConditionalGeneration", "InternVLProcessor"),
    ("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor"),
    ("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor"),
    ("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Processor"),
])
def test_every_family_builds_reproducibly_and_loads_with_its_own_processor(tmp_path, family, arch, processor):
    """The family's own processor class (saved by save_pretrained), its config type, head_dim 64, seeded weights."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText

    from agents.families import image_token_id, load_processor

    torch.set_num_threads(1)
    a = build_tiny(tmp_path / "a", family)
    b = build_tiny(tmp_path / "b", family)
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    model = AutoModelForImageTextToText.from_pretrained(a)
    assert type(model).__name__ == arch and model.config.model_type == family
    text = model.config.get_text_config()
    assert getattr(text, "head_dim", text.hidden_size // text.num_attention_heads) == 64
    proc = load_processor(str(a))
    assert type(proc).__name__ == processor
    assert json.loads((a / "processor_config.json").read_text())["processor_class"] == processor
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A"}]}],
                                      tokenize=False, add_generation_prompt=True)
    enc = proc(text=[prompt], images=[[np.zeros((210, 160, 3), np.uint8)]], return_tensors="pt",
               add_special_tokens=False)
    n_image = int((enc["input_ids"] == image_token_id(model.config)).sum())
    assert 16 <= n_image <= 96  # a few dozen tokens per frame (LLaVA-OneVision: 72, base + any-resolution tiles)
    assert json.loads((a / "neuroarcade_tiny.json").read_text())["family"] == family


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny family 'magma'"):
        build_tiny(tmp_path, "magma")

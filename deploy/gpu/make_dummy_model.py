"""Write a config-only Qwen2.5-VL-7B-shaped model directory for ``--load-format dummy`` (no hub access).

vLLM's dummy loader fills random weights, so a GPU host without the real checkpoint can still measure
latency at the real shapes: ``deploy/gpu/check.sh DIR`` with ``MODEL_ARGS="--load-format dummy"``.
The tokenizer is the tiny local one (agents/tiny.py); the vocabulary size of the config is the real
152,064 so the LM head costs what it costs in the real model.

    python deploy/gpu/make_dummy_model.py /tmp/qwen2.5-vl-7b-dummy
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(out_dir: str) -> Path:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from agents import tiny

    # Qwen2.5-VL-7B-Instruct text/vision shapes (config.json of the release).
    cfg = tiny.TinyConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=28,
                          intermediate_size=18944, vision_depth=32, vision_hidden_size=1280, vision_heads=16)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny._train_tokenizer(tiny.TinyConfig())
    config = tiny._model_config(cfg, "vlm", tok)
    config.text_config.vocab_size = 152064
    config.vision_config.intermediate_size = 3420
    config.vision_config.fullatt_block_indexes = [7, 15, 23, 31]
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=256 * 28 * 28).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    (out / "chat_template.jinja").write_text(tiny.CHAT_TEMPLATE)
    return out


if __name__ == "__main__":
    print(main(sys.argv[1]))

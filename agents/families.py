"""Model families the VLM/LAM agent runs, what differs between them, and the method's model presets.

The agent has one code path for every family (agents/vlm.py): transformers' ``AutoModelForImageTextToText``,
the family's own processor (its image processor, its image-token expansion, its chat template) and the
hidden states the model returns. What really differs is in :data:`FAMILIES`, one row per transformers
``model_type``:

* which token marks image positions in the expanded prompt (pooled by ``mean_image``): the config's
  ``image_token_id`` / ``image_token_index`` — for Gemma 3 that is ``<image_soft_token>``, not the
  ``<start_of_image>`` placeholder its chat template writes;
* whether vLLM serves the family (its decoder layers are found the same way for all of them:
  ``get_language_model().model.layers``, agents/vllm_worker.py) and whether vLLM takes the Qwen pixel
  budget (``max_pixels``) or the family's own image settings;
* what extra inputs the model needs (the processor returns them:
  Qwen's ``mm_token_type_ids`` for M-RoPE, Gemma 3's ``token_type_ids`` for bidirectional image attention,
  LLaVA-OneVision's ``image_sizes``, Idefics3's ``pixel_attention_mask`` — the backend checks they came).

Errors a user can cause by naming a model (unknown family, no processor offline, labels that are not single
tokens) raise :class:`ModelError`, one line naming the model and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ModelError(ValueError):
    """A model the agent cannot run: names the model and the reason (the CLI prints it as one line)."""

    def __init__(self, model: str, reason: str):
        self.model, self.reason = model, reason
        super().__init__(f"model {model!r}: {reason}")


@dataclass(frozen=True)
class Family:
    """What differs between model families; everything else goes through the shared transformers path."""

    model_type: str
    """transformers ``config.model_type``."""
    label: str
    """Human name (error messages, README)."""
    extra_inputs: tuple[str, ...] = ()
    """Inputs beside input_ids/attention_mask/pixel_values the model needs: the processor produces them and the
    transformers backend refuses a processor that did not (Qwen without ``mm_token_type_ids`` runs, wrongly)."""
    vllm: bool = True
    """vLLM has this architecture (the vLLM backend refuses it otherwise)."""
    vllm_multi_image: bool = True
    """vLLM treats a prompt with several images as transformers does (False: the vLLM backend refuses it)."""
    vllm_caveat: str = ""
    """Where vLLM computes something other than transformers for this family (warned at engine start)."""
    pixel_budget: bool = False
    """Images are sized by a pixel budget (Qwen ``min_pixels``/``max_pixels``); else fixed tiles."""
    notes: str = ""
    """Why the row differs (kept short)."""


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_5_vl", "Qwen2.5-VL", ("mm_token_type_ids", "image_grid_thw"), pixel_budget=True,
           notes="M-RoPE needs mm_token_type_ids; image tokens are <|image_pad|>"),
    Family("qwen2_vl", "Qwen2-VL (UI-TARS, OS-Atlas)", ("mm_token_type_ids", "image_grid_thw"), pixel_budget=True,
           notes="as Qwen2.5-VL"),
    Family("internvl", "InternVL3 (transformers-native -hf checkpoints)", (),
           notes="<img><IMG_CONTEXT>×256</img> per tile; one tile per frame in the preset"),
    Family("llava_onevision", "LLaVA-OneVision", ("image_sizes",), vllm_multi_image=False,
           notes="any-resolution tiles + newline tokens, all <image>; several images per prompt: base features only "
                 "in transformers, but vLLM 0.32 still tiles each (measured Δp 0.05 on 4 frames)"),
    Family("idefics3", "Idefics3", ("pixel_attention_mask",),
           notes="<fake_token_around_image><global-img><image>×N per frame"),
    Family("smolvlm", "SmolVLM", ("pixel_attention_mask",), notes="Idefics3 architecture; its processor needs the num2words package (not installed here: untested)"),
    Family("gemma3", "Gemma 3", ("token_type_ids",),
           vllm_caveat="vLLM 0.32 attends causally over image tokens, transformers bidirectionally within each image "
                       "(token_type_ids): decisions and activations differ slightly between the backends",
           notes="image tokens are <image_soft_token>, attended bidirectionally (token_type_ids)"),
)}


def family_of(model: str):
    """(Family, config) of a hub name or local directory; :class:`ModelError` when unknown or unreadable."""
    from pathlib import Path

    from transformers import AutoConfig

    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise ModelError(model, "no such local directory")
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(model, f"its config could not be read ({_first_line(err)})") from None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ModelError(model, f"family {config.model_type!r} is not supported by the agent; supported: "
                                f"{', '.join(FAMILIES)}")
    return family, config


def image_token_id(config) -> int:
    """Id of the token that stands for one image feature in the expanded prompt (what mean_image pools)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ModelError(getattr(config, "_name_or_path", "?"), "its config names no image token")


def image_only_processor(cls):
    """``cls`` (a transformers processor class) without its video processor.

    Qwen2-VL, InternVL, LLaVA-OneVision and SmolVLM processors also load a video processor, which exists
    only for torchvision; we never feed video. The subclass drops that attribute, so it loads, saves and
    reloads with the image processor and tokenizer alone (same class name: a saved one names ``cls``).
    """
    base = cls.get_attributes()
    if "video_processor" not in base:
        return cls

    class ImageOnly(cls):
        @classmethod
        def get_attributes(klass):
            return [a for a in base if a != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def load_processor(model: str, config=None):
    """The family's processor for a hub name or local directory.

    ``AutoProcessor`` first (what a hub checkpoint ships); where it fails on the video processor, the
    same class without it. A processor that cannot be loaded at all (no hub access and nothing cached,
    missing files) raises :class:`ModelError` naming the model and transformers' reason.
    """
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import processor_class_from_name

    try:
        return AutoProcessor.from_pretrained(model)
    except Exception as err:  # noqa: BLE001 — retried below; the reason is reported if that fails too
        first = err
    try:
        import json

        from transformers.utils import cached_file

        name = None
        path = cached_file(model, "processor_config.json", _raise_exceptions_for_missing_entries=False)
        if path:
            with open(path) as f:
                name = json.load(f).get("processor_class")
        if name is None:
            from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

            config = config or family_of(model)[1]
            name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
        cls = processor_class_from_name(name) if name else None
        if cls is None:
            raise first
        return image_only_processor(cls).from_pretrained(model)
    except ModelError:
        raise
    except Exception:  # noqa: BLE001
        raise ModelError(model, f"its processor could not be loaded ({_first_line(first)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()


@dataclass(frozen=True)
class Preset:
    """One of the method's models (Oota et al. 2026) with the settings the agent uses for it."""

    model: str
    """Hub name."""
    family: str
    """transformers model_type (a key of :data:`FAMILIES`)."""
    layers: tuple[int, ...] | None
    """Hidden-state entries to publish (0 = embeddings); None = all (29 for these 28-layer decoders)."""
    image_kwargs: dict = field(default_factory=dict)
    """Processor image settings per frame, so a 210×160 frame costs few tokens and is not upscaled."""
    dtype: str = "bfloat16"
    """Weights dtype on GPU."""
    role: str = "vlm"
    """``vlm`` or ``lam`` (a GUI action model)."""


# Qwen2(.5)-VL: at most the frame's native size in pixels (224×168 after rounding to 28 px) → 48 tokens per frame
# (the processor's ``size`` in pixels; ``min_pixels``/``max_pixels`` at call time are deprecated in transformers 5).
_QWEN_IMAGES = {"size": {"shortest_edge": 56 * 56, "longest_edge": 224 * 168}}
PRESETS: dict[str, Preset] = {
    "qwen2.5-vl-7b": Preset("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", None, _QWEN_IMAGES),
    # One 448-pixel tile per frame (256 tokens): dynamic tiling would cut a 210×160 frame into 12 tiles + thumbnail.
    "internvl3-8b": Preset("OpenGVLab/InternVL3-8B-hf", "internvl", None, {"crop_to_patches": False}),
    "ui-tars-7b-dpo": Preset("ByteDance-Seed/UI-TARS-7B-DPO", "qwen2_vl", None, _QWEN_IMAGES, role="lam"),
    "os-atlas-pro-7b": Preset("OS-Copilot/OS-Atlas-Pro-7B", "qwen2_vl", None, _QWEN_IMAGES, role="lam"),
}
"""``--model`` short names; the hub names themselves pick the same preset (:func:`preset_for`)."""


def preset_for(model: str) -> Preset | None:
    """The preset a ``--model`` value names (short name or hub name, case-insensitive), else None."""
    key = model.lower()
    for name, preset in PRESETS.items():
        if key in (name, preset.model.lower()):
            return preset
    return None

"""VLM / LAM agent: constrained action choice and hidden-state activations from one forward pass.

The agent (:class:`VLMAgent`) is backend-neutral: it builds the prompts (agents/prompts.py), asks
a backend for the next-token logits of the action labels and the pooled hidden states of every
sequence, and turns them into a :class:`~agents.base.Decision`. A backend implements
:class:`VLMBackend`; :class:`TransformersBackend` is the one here (agents/vllm_backend.py the other).

One path for every model family (agents/families.py): ``AutoModelForImageTextToText``, the family's own
processor (image processing, image-token expansion, chat template) and the hidden states the model returns.
``--model`` may also name a preset of the method's models (``families.PRESETS``: hub name, layers, image
settings).

Several prompt conditions on the same frames run as one batch (left-padded, so the last position
of every row is the token the label is predicted from).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agents.base import ActivationSet, Choice, Decision, Observation
from agents.families import ModelError, family_of, image_token_id, load_processor, preset_for
from agents.prompts import ActionLabels, action_labels, build_messages, label_probs, load_conditions

POOLINGS = ("last_token", "mean_image")
MAX_ACTIONS = 18
"""The full ALE action set: a model must have this many single-token labels."""


@dataclass
class VLMConfig:
    """How to load and run a VLM/LAM agent."""

    model: str
    """Hub name (e.g. ``Qwen/Qwen2.5-VL-7B-Instruct``) or local directory (e.g. a build-tiny output)."""
    conditions: list[str] = field(default_factory=lambda: ["action"])
    """Prompt conditions to run on every observation: built-ins none/action/reasoning or names from prompts_file."""
    prompts_file: str | None = None
    """TOML/JSON file of extra ``name = "prompt text"`` conditions."""
    device: str = "cpu"
    """torch device: ``cpu``, ``cuda``, ``cuda:1``…"""
    dtype: str = "float32"
    """Model weights dtype: float32, bfloat16 or float16 (bf16 on GPU for 7B models)."""
    layers: list[int] | None = None
    """Hidden-state layers to publish (0 = embeddings, 1..N = decoder layers); None = all."""
    poolings: tuple[str, ...] = POOLINGS
    """Poolings to publish: ``last_token`` and/or ``mean_image``."""
    activation_dtype: str = "float16"
    """float16 halves the bytes on the wire; float32 keeps the model's precision."""
    batch_conditions: bool = True
    """Run all conditions in one batched forward (False: one forward per condition)."""
    torch_threads: int = 1
    """torch intra-op threads; 1 for small models (2 threads was 60× slower on 2-core boxes)."""
    image_kwargs: dict = field(default_factory=dict)
    """Image settings passed to the family's processor (e.g. Qwen ``size`` in pixels, InternVL ``crop_to_patches``);
    empty = the preset's, else the checkpoint's own."""


def resolve_preset(cfg: VLMConfig) -> VLMConfig:
    """``cfg`` with a preset's hub name, layers and image settings filled in where ``cfg.model`` names one.

    Settings given explicitly win; idempotent (a resolved hub name maps to the same preset).
    """
    from dataclasses import replace

    preset = preset_for(cfg.model)
    if preset is None:
        return cfg
    return replace(cfg, model=preset.model,
                   layers=cfg.layers if cfg.layers is not None else (list(preset.layers) if preset.layers else None),
                   image_kwargs=cfg.image_kwargs or dict(preset.image_kwargs))


@dataclass
class Forward:
    """One forward pass of a backend over a batch of prompt sequences."""

    label_logits: np.ndarray
    """(n_sequences, n_labels) logits of the label tokens at the next position."""
    pooled: dict[str, np.ndarray]
    """pooling name → (n_sequences, n_layers_selected, dim) float32."""
    timings_ms: dict[str, float]
    """Stage name → milliseconds spent in it (tokenise, forward, pool …)."""


class VLMBackend(Protocol):
    """What VLMAgent needs from a model runtime."""

    name: str
    tokenizer: object
    """Hugging Face tokenizer (the action labels' token ids come from it)."""
    processor: object
    """The family's processor, or a tokenizer: its ``apply_chat_template`` renders the prompts."""
    num_layers: int
    """Number of hidden-state entries (embeddings + decoder layers)."""

    def run(self, images: list[np.ndarray], prompts: list[str], label_ids: tuple[int, ...],
            layers: list[int], poolings: tuple[str, ...]) -> Forward: ...


def pool_hidden(hidden: list[np.ndarray] | tuple, image_mask: np.ndarray, layers: list[int],
                poolings: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Pool per-layer hidden states of a left-padded batch.

    ``hidden[l]`` is (B, T, D) for hidden-state entry l; ``image_mask`` (B, T) marks image tokens.
    Returns pooling → (B, len(layers), D). last_token is position -1 (left padding).
    """
    out: dict[str, np.ndarray] = {}
    if "last_token" in poolings:
        out["last_token"] = np.stack([np.asarray(hidden[l][:, -1, :], dtype=np.float32) for l in layers], axis=1)
    if "mean_image" in poolings:
        m = image_mask.astype(np.float32)[:, :, None]
        n = np.maximum(m.sum(axis=1), 1.0)
        out["mean_image"] = np.stack(
            [(np.asarray(hidden[l], dtype=np.float32) * m).sum(axis=1) / n for l in layers], axis=1)
    return out


class TransformersBackend:
    """Hugging Face transformers runtime for every family in agents/families.py (hub name or local dir)."""

    def __init__(self, cfg: VLMConfig):
        import torch
        from transformers import AutoModelForImageTextToText

        cfg = resolve_preset(cfg)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.torch = torch
        self.name = cfg.model
        self.device = torch.device(cfg.device)
        self.family, config = family_of(cfg.model)
        self.processor = load_processor(cfg.model, config)
        self.tokenizer = self.processor.tokenizer
        self.image_kwargs = dict(cfg.image_kwargs)
        try:
            self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype))
        except OSError as err:
            raise ModelError(cfg.model, f"its weights could not be loaded ({err})") from None
        self.model.to(self.device).eval()
        # The expanded prompt's image-feature token (mean_image pools these) and the chat template's placeholder.
        self.image_token_id = image_token_id(config)
        self.image_token = self.processor.image_token
        self.num_layers = config.get_text_config().num_hidden_layers + 1

    def prepare(self, images: list[np.ndarray], prompts: list[str]) -> dict:
        """Model inputs for the prompts, each carrying all ``images``: the family's processor, left-padded.

        The processor expands each image placeholder (its image-token layout) and returns the extra inputs
        the family needs (Qwen's mm_token_type_ids and image_grid_thw, Gemma 3's token_type_ids, …). The frames
        are processed once per prompt row: the processor's own path, which is what makes it family-agnostic.
        """
        for prompt in prompts:
            if prompt.count(self.image_token) != len(images):
                raise ValueError(f"prompt has {prompt.count(self.image_token)} image slots for {len(images)} images")
        enc = self.processor(text=list(prompts), images=[list(images) for _ in prompts], return_tensors="pt",
                             padding=True, padding_side="left", add_special_tokens=False, **self.image_kwargs)
        missing = [k for k in self.family.extra_inputs if k not in enc]
        if missing:  # e.g. Qwen without mm_token_type_ids silently drops M-RoPE for image tokens
            raise ModelError(self.name, f"its processor ({type(self.processor).__name__}) returned no {missing}")
        dtype = self.model.dtype
        return {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in enc.items() if hasattr(v, "to")}

    def run(self, images, prompts, label_ids, layers, poolings) -> Forward:
        torch = self.torch
        t0 = time.perf_counter()
        inputs = self.prepare(images, prompts)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        t2 = time.perf_counter()
        ids = torch.tensor(label_ids, device=out.logits.device)
        label_logits = out.logits[:, -1, :].index_select(-1, ids).float().cpu().numpy()
        hidden = [h.float().cpu().numpy() if i in layers else None for i, h in enumerate(out.hidden_states)]
        image_mask = (inputs["input_ids"] == self.image_token_id).cpu().numpy()
        pooled = pool_hidden(hidden, image_mask, layers, poolings)
        t3 = time.perf_counter()
        return Forward(label_logits, pooled, {"preprocess": (t1 - t0) * 1e3, "forward": (t2 - t1) * 1e3,
                                              "score": (t3 - t2) * 1e3})


class VLMAgent:
    """Agent interface over a VLM backend: one Choice and activation sets per prompt condition."""

    def __init__(self, cfg: VLMConfig, backend: VLMBackend | None = None):
        cfg = resolve_preset(cfg)
        self.cfg = cfg
        self.backend = backend or TransformersBackend(cfg)
        self.name = cfg.model
        known = load_conditions(cfg.prompts_file)
        missing = [c for c in cfg.conditions if c not in known]
        if missing:
            raise ValueError(f"unknown prompt condition(s) {missing}; known: {sorted(known)}")
        self.conditions = list(cfg.conditions)
        self.condition_text = {c: known[c] for c in self.conditions}
        n = self.backend.num_layers
        self.layers = list(range(n)) if cfg.layers is None else list(cfg.layers)
        bad = [l for l in self.layers if not 0 <= l < n]
        if bad:
            raise ValueError(f"layers {bad} out of range: the model has hidden-state entries 0..{n - 1}")
        unknown = [p for p in cfg.poolings if p not in POOLINGS]
        if unknown:
            raise ValueError(f"unknown pooling(s) {unknown}; choose from {POOLINGS}")
        self._labels: dict[tuple[str, ...], ActionLabels] = {}
        self._prompts: dict[tuple[int, tuple[str, ...]], list[str]] = {}
        try:  # now, not at the first frame: a model whose labels cannot work is refused before it joins a game
            action_labels(self.backend.tokenizer, tuple(f"action{i}" for i in range(MAX_ACTIONS)))
        except ValueError as err:
            raise ModelError(cfg.model, f"action labels must be distinct single tokens: {err}") from None

    def labels(self, meanings: tuple[str, ...]) -> ActionLabels:
        if meanings not in self._labels:
            self._labels[meanings] = action_labels(self.backend.tokenizer, meanings)
        return self._labels[meanings]

    def prompts(self, n_images: int, meanings: tuple[str, ...]) -> list[str]:
        """Full prompt text for each condition (chat template applied, generation prompt open); cached."""
        key = (n_images, tuple(meanings))
        if key not in self._prompts:
            labels = self.labels(key[1])
            template = getattr(self.backend, "processor", None) or self.backend.tokenizer
            self._prompts[key] = [template.apply_chat_template(
                build_messages(self.condition_text[c], n_images, labels), tokenize=False, add_generation_prompt=True)
                for c in self.conditions]
        return list(self._prompts[key])

    def infer(self, obs: Observation) -> Decision:
        meanings = tuple(obs.action_meanings)
        labels = self.labels(meanings)
        images = [f.pixels for f in obs.frames]
        prompts = self.prompts(len(images), meanings)
        groups = [list(range(len(prompts)))] if self.cfg.batch_conditions else [[i] for i in range(len(prompts))]
        choices, activations, timings = [], [], {}
        act_dtype = np.dtype(self.cfg.activation_dtype)
        for group in groups:
            fwd = self.backend.run(images, [prompts[i] for i in group], labels.token_ids, self.layers,
                                   tuple(self.cfg.poolings))
            for k, v in fwd.timings_ms.items():
                timings[k] = timings.get(k, 0.0) + v
            probs = label_probs(fwd.label_logits)
            for row, i in enumerate(group):
                cond = self.conditions[i]
                choices.append(Choice(cond, int(np.argmax(probs[row])), probs[row]))
                for pooling in self.cfg.poolings:
                    activations.append(ActivationSet(cond, list(self.layers), pooling,
                                                     fwd.pooled[pooling][row].astype(act_dtype)))
        order = {c: i for i, c in enumerate(self.conditions)}
        choices.sort(key=lambda ch: order[ch.condition])
        return Decision(choices, activations, [f.seq for f in obs.frames], obs.newest.t_ns, timings)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        """Release the backend (an in-process vLLM engine runs in a subprocess that must be shut down)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


BACKENDS = ("transformers", "vllm")


def build_backend(cfg: VLMConfig, backend: str = "transformers", vllm_url: str | None = None,
                  vllm_transport: str = "shm", vllm_activations_dir: str | None = None) -> VLMBackend:
    """The model runtime a CLI/spec names: transformers, or vLLM in this process (no URL) or at ``vllm_url``.

    vLLM in-process needs the ``vllm`` package (GPU: the ``[vllm]`` extra; CPU: the .venv-vllm recipe);
    a missing one raises :class:`agents.vllm_backend.VllmUnavailable` with that advice, not an ImportError.
    """
    cfg = resolve_preset(cfg)
    if backend == "transformers":
        return TransformersBackend(cfg)
    if backend != "vllm":
        raise ValueError(f"unknown VLM backend {backend!r}; choose from {BACKENDS}")
    from agents.vllm_backend import VllmBackend, VllmConfig, require_vllm

    if vllm_transport not in ("shm", "rpc"):
        raise ValueError(f"unknown vLLM activation transport {vllm_transport!r}; choose shm or rpc")
    require_vllm(remote=bool(vllm_url))
    extra = {"activations_dir": vllm_activations_dir} if vllm_activations_dir else {}
    if cfg.image_kwargs and "size" not in cfg.image_kwargs:  # Qwen's size budget is VllmConfig.max_pixels
        extra["mm_processor_kwargs"] = dict(cfg.image_kwargs)
    return VllmBackend(VllmConfig(model=cfg.model, dtype=cfg.dtype, server_url=vllm_url or None,
                                  activation_transport=vllm_transport, **extra))

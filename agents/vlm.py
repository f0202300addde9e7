"""VLM / LAM agent: constrained action choice and hidden-state activations from one forward pass.

The agent (:class:`VLMAgent`) is backend-neutral: it builds the prompts (agents/prompts.py), asks
a backend for the next-token logits of the action labels and the pooled hidden states of every
sequence, and turns them into a :class:`~agents.base.Decision`. A backend implements
:class:`VLMBackend`; :class:`TransformersBackend` is the one here (a vLLM backend can slot in).

Several prompt conditions on the same frames run as one batch (left-padded, so the last position
of every row is the token the label is predicted from).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agents.base import ActivationSet, Choice, Decision, Observation
from agents.prompts import ActionLabels, action_labels, build_messages, label_probs, load_conditions

POOLINGS = ("last_token", "mean_image")


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
    """Hugging Face tokenizer with a chat template (labels and prompt text come from it)."""
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
    """Hugging Face transformers runtime for Qwen2.5-VL / Qwen2-VL checkpoints (hub or local)."""

    def __init__(self, cfg: VLMConfig):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.torch = torch
        self.name = cfg.model
        self.device = torch.device(cfg.device)
        # Tokenizer + image processor rather than AutoProcessor: the Qwen processors also load a video
        # processor that needs torchvision (REFERENCE §7); we never feed video.
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.image_processor = AutoImageProcessor.from_pretrained(cfg.model)
        self.model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype))
        self.model.to(self.device).eval()
        mc = self.model.config
        self.image_token_id = mc.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        text_cfg = getattr(mc, "text_config", mc)
        self.num_layers = text_cfg.num_hidden_layers + 1
        self.merge = self.image_processor.merge_size ** 2

    def prepare(self, images: list[np.ndarray], prompts: list[str]) -> dict:
        """Model inputs for the prompts, each carrying all ``images`` (repeated per row)."""
        torch = self.torch
        vis = self.image_processor(images=list(images), return_tensors="pt")
        n_tokens = [int(g.prod()) // self.merge for g in vis["image_grid_thw"]]
        texts = []
        for prompt in prompts:
            parts = prompt.split(self.image_token)
            if len(parts) - 1 != len(images):
                raise ValueError(f"prompt has {len(parts) - 1} image slots for {len(images)} images")
            text = parts[0]
            for n, rest in zip(n_tokens, parts[1:]):
                text += self.image_token * n + rest
            texts.append(text)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        rows = len(prompts)
        # What the hub processor returns beside input_ids: without it Qwen2.5-VL silently skips M-RoPE
        # (1-D positions for image tokens) and Qwen2-VL refuses the input. 0 text, 1 image.
        mm_types = (enc["input_ids"] == self.image_token_id).long()
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "mm_token_type_ids": mm_types.to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
            "pixel_values": torch.cat([vis["pixel_values"]] * rows).to(self.device, self.model.dtype),
            "image_grid_thw": torch.cat([vis["image_grid_thw"]] * rows).to(self.device),
        }

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

    def labels(self, meanings: tuple[str, ...]) -> ActionLabels:
        if meanings not in self._labels:
            self._labels[meanings] = action_labels(self.backend.tokenizer, meanings)
        return self._labels[meanings]

    def prompts(self, n_images: int, meanings: tuple[str, ...]) -> list[str]:
        """Full prompt text for each condition (chat template applied, generation prompt open); cached."""
        key = (n_images, tuple(meanings))
        if key not in self._prompts:
            labels = self.labels(key[1])
            self._prompts[key] = [self.backend.tokenizer.apply_chat_template(
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
    if backend == "transformers":
        return TransformersBackend(cfg)
    if backend != "vllm":
        raise ValueError(f"unknown VLM backend {backend!r}; choose from {BACKENDS}")
    from agents.vllm_backend import VllmBackend, VllmConfig, require_vllm

    if vllm_transport not in ("shm", "rpc"):
        raise ValueError(f"unknown vLLM activation transport {vllm_transport!r}; choose shm or rpc")
    require_vllm(remote=bool(vllm_url))
    extra = {"activations_dir": vllm_activations_dir} if vllm_activations_dir else {}
    return VllmBackend(VllmConfig(model=cfg.model, dtype=cfg.dtype, server_url=vllm_url or None,
                                  activation_transport=vllm_transport, **extra))

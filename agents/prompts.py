"""Backend-neutral prompt building and action labels for VLM/LAM agents.

Shared by every backend (transformers here, vLLM later): the chat messages for a condition, the
single-token action labels and their token ids, and the softmax over the allowed label logits.

Prompt order is system → image(s) → condition text, so that two conditions on the same frames
share the whole image prefix (prefix/KV caching) and differ only in their trailing text.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYSTEM_PROMPT = "You are playing an Atari game. Each turn you see the newest game frames and choose one action."

# Built-in prompt conditions (REFERENCE §1): no instruction, action-focused, reasoning-focused.
BUILTIN_CONDITIONS: dict[str, str] = {
    "none": "",
    "action": "Commit to the next action and justify it briefly.",
    "reasoning": "Analyse the objects, the space and the threats step by step, then act.",
}

# Candidate labels, in order; each must encode to one token, distinct from the others.
LABEL_CANDIDATES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def load_conditions(path: str | Path | None) -> dict[str, str]:
    """Built-in conditions plus user templates from a TOML or JSON file of ``name = "text"``.

    TOML may also nest them under ``[conditions]``. User names override built-ins.
    """
    conditions = dict(BUILTIN_CONDITIONS)
    if path is None:
        return conditions
    p = Path(path)
    raw = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    raw = raw.get("conditions", raw)
    for name, text in raw.items():
        if not isinstance(text, str):
            raise ValueError(f"{p}: prompt condition {name!r} must be a string, got {type(text).__name__}")
        conditions[name] = text
    return conditions


@dataclass(frozen=True)
class ActionLabels:
    """One distinct single-token label per legal action."""

    labels: tuple[str, ...]
    token_ids: tuple[int, ...]
    meanings: tuple[str, ...]

    def menu(self) -> str:
        return " ".join(f"{label}={meaning}" for label, meaning in zip(self.labels, self.meanings))


def action_labels(tokenizer, meanings: list[str] | tuple[str, ...]) -> ActionLabels:
    """Pick labels that encode to single, distinct tokens (``A``, ``B``, …) for the actions.

    ``tokenizer`` is any Hugging Face tokenizer. The label is what the model writes right after
    the assistant turn opens, so it is encoded without a leading space.
    """
    labels, ids = [], []
    for cand in LABEL_CANDIDATES:
        enc = tokenizer.encode(cand, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            labels.append(cand)
            ids.append(enc[0])
        if len(labels) == len(meanings):
            break
    if len(labels) < len(meanings):
        raise ValueError(f"tokenizer has only {len(labels)} single-token labels for {len(meanings)} actions")
    return ActionLabels(tuple(labels), tuple(ids), tuple(meanings))


def build_messages(condition_text: str, n_images: int, labels: ActionLabels) -> list[dict]:
    """Chat messages: system, then the user turn with the images first and the condition text last.

    Every content is a list of typed parts (not a bare string): some families' hub templates (Idefics3)
    iterate the parts of every message.
    """
    instruction = f"Actions: {labels.menu()}. Answer with one letter."
    text = f"{condition_text} {instruction}".strip()
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": content}]


def label_probs(label_logits: np.ndarray) -> np.ndarray:
    """Softmax over the logits of the allowed label tokens only (float32, sums to 1)."""
    z = np.asarray(label_logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)

"""vLLM worker extension: pooled residual-stream activations from forward hooks on decoder layers.

Loaded inside the vLLM worker process with ``worker_extension_cls="agents.vllm_worker.ActivationCapture"``
(``vllm serve --worker-extension-cls agents.vllm_worker.ActivationCapture``) and driven by
``collective_rpc``. vLLM has no sampling option for hidden states (REFERENCE §6), so:

* Hooks on the chosen decoder layers see the *batched* tokens of every request scheduled in this step.
  vLLM's decoder layers return ``(hidden, residual)``; the residual stream after a layer — what
  transformers calls ``hidden_states[l]`` — is their sum. Entry 0 (embeddings) is the first layer's input;
  the last entry is taken after the final norm, as transformers reports it.
* Tokens are mapped back to requests with the model runner's own batch layout (``input_batch.req_ids``,
  ``query_start_loc``, ``num_computed_tokens``), so several requests per step and prompts split over steps
  (chunked prefill) are handled. Only prompt tokens count; generated tokens are ignored.
* Only requests that carry ``extra_args={"neuroarcade_key": KEY}`` (HTTP: ``vllm_xargs``) are captured;
  when a request's prompt is complete its pooled vectors (``last_token``, ``mean_image``) are stored under
  KEY: in memory for :meth:`take_activations` (in-process), and, when ``out_dir`` is set, as
  ``out_dir/KEY.safetensors`` written atomically (the side channel for a ``vllm serve`` deployment).
* Prefix-cache hits: tokens served from the cache are not recomputed, so their hidden states never pass
  the hooks. Every record carries ``num_cached_tokens``; ``mean_image`` is only emitted when no image
  token was cached, otherwise the record is flagged incomplete and the client raises — never silently
  missing. The backend avoids that case by asking such requests not to read the prefix cache (they still
  write it). ``last_token`` is always computed (vLLM recomputes at least the last prompt token).
* Hooks need eager mode (``enforce_eager=True``): a captured CUDA graph or compiled graph would bypass
  the Python hooks.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

KEY_ARG = "neuroarcade_key"
"""SamplingParams.extra_args key naming where a request's activations go."""

POOLINGS = ("last_token", "mean_image")


@dataclass
class _Pending:
    """Pooling state of one request, accumulated on the model's device over one or more steps."""

    key: str
    image_mask: torch.Tensor
    """bool (n_prompt,) on CPU: which prompt tokens are image tokens."""
    first_computed: int
    """Tokens already computed (prefix-cache hit) when the request was first seen."""
    image_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer → sum over the computed image tokens' hidden states (device, float32)."""
    last: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer → hidden state of the last prompt token (device)."""


@dataclass
class _Rows:
    """Where one captured request sits in this step's batch."""

    req_id: str
    image_rows: torch.Tensor | None
    """Batch row indices of this request's image tokens in this step (device), or None."""
    last_row: int | None
    """Batch row of the last prompt token if this step computes it."""
    done: bool
    """The prompt is complete after this step."""


class ActivationCapture:
    """Mixed into vLLM's Worker class; every public method is callable through ``collective_rpc``."""

    def configure_activations(self, config_json: str) -> dict:
        """Install hooks. ``config_json``: ``{"layers": [...], "poolings": [...], "out_dir": str|null}``.

        JSON text because the HTTP ``/collective_rpc`` route only passes strings. Returns what was set up.
        """
        cfg = json.loads(config_json)
        self._na_remove_hooks()
        model = self.model_runner.get_model()
        layers_module, final_norm = _decoder_layers(model)
        n = len(layers_module)
        layers = sorted(set(int(l) for l in cfg.get("layers") or range(n + 1)))
        if not all(0 <= l <= n for l in layers):
            raise ValueError(f"layers {layers} out of range 0..{n}")
        poolings = tuple(cfg.get("poolings") or POOLINGS)
        hf_cfg = self.model_runner.model_config.hf_config
        self._na = {
            "layers": layers, "poolings": poolings, "n_layers": n,
            "out_dir": cfg.get("out_dir"), "image_token_id": _image_token_id(hf_cfg),
            "pending": {}, "ready": {}, "rows": [], "handles": [],
        }
        if self._na["out_dir"]:
            Path(self._na["out_dir"]).mkdir(parents=True, exist_ok=True)
        handles = self._na["handles"]
        for l in layers:
            if l == 0:
                handles.append(layers_module[0].register_forward_pre_hook(self._na_embed_hook))
            elif l == n and final_norm is not None:
                handles.append(final_norm.register_forward_hook(self._na_layer_hook(l, final=True)))
            else:
                handles.append(layers_module[l - 1].register_forward_hook(self._na_layer_hook(l)))
        return {"layers": layers, "poolings": list(poolings), "num_layers": n, "out_dir": self._na["out_dir"]}

    def take_activations(self, keys: list[str] | str) -> dict:
        """Pop finished records: key → {"vectors": {pooling: {"shape", "b64"}}, "num_cached_tokens", ...}.

        ``keys``: a list, or its JSON text (the HTTP ``/collective_rpc`` route passes strings only).
        """
        if isinstance(keys, str):
            keys = json.loads(keys)
        ready = self._na["ready"]
        return {k: ready.pop(k) for k in keys if k in ready}

    def activation_status(self) -> dict:
        """Counts for health checks: hooks installed, requests pending / ready."""
        na = getattr(self, "_na", None)
        if na is None:
            return {"configured": False}
        return {"configured": True, "layers": na["layers"], "pending": len(na["pending"]), "ready": len(na["ready"])}

    # --- hooks --------------------------------------------------------------------------------------

    def _na_remove_hooks(self) -> None:
        for h in getattr(self, "_na", {}).get("handles", []):
            h.remove()

    def _na_embed_hook(self, module, args):
        # Decoder layer signature: forward(positions, hidden_states, residual); residual is None at layer 0.
        self._na_capture(0, args[1])

    def _na_layer_hook(self, layer: int, final: bool = False):
        def hook(module, args, output):
            if final:  # final norm returns (normed, residual) with a residual input, else a tensor
                hidden = output[0] if isinstance(output, tuple) else output
            else:
                hidden, residual = output
                hidden = hidden if residual is None else hidden + residual
            self._na_capture(layer, hidden)
        return hook

    def _na_batch(self, device: torch.device) -> list[_Rows]:
        """Captured requests of this step and their rows, from the model runner's batch layout."""
        na = self._na
        runner = self.model_runner
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        qsl = runner.query_start_loc.np[: num_reqs + 1]
        out = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            extra = (params.extra_args or {}) if params is not None else {}
            if KEY_ARG not in extra:
                continue
            start, count = int(qsl[i]), int(qsl[i + 1] - qsl[i])
            position = int(batch.num_computed_tokens_cpu[i])
            p = na["pending"].get(req_id)
            if p is None:
                ids = torch.tensor(list(state.prompt_token_ids or []))
                mask = ids == na["image_token_id"] if na["image_token_id"] is not None else ids < 0
                p = na["pending"][req_id] = _Pending(str(extra[KEY_ARG]), mask, position)
            n_prompt = len(p.image_mask)
            take = max(0, min(count, n_prompt - position))  # prompt tokens only; generated ones are ignored
            local = torch.nonzero(p.image_mask[position:position + take]).flatten()
            image_rows = (local + start).to(device) if len(local) else None
            last_row = start + take - 1 if take and position + take == n_prompt else None
            out.append(_Rows(req_id, image_rows, last_row, position + count >= n_prompt))
        return out

    def _na_capture(self, layer: int, hidden: torch.Tensor) -> None:
        na = self._na
        if layer == na["layers"][0]:  # first hook of this forward: read the batch layout once
            na["rows"] = self._na_batch(hidden.device)
        rows: list[_Rows] = na.get("rows", [])
        if not rows:
            return
        pending: dict[str, _Pending] = na["pending"]
        for r in rows:
            p = pending[r.req_id]
            # Pool on the device: only (layers × dim) per request ever leaves it.
            if r.image_rows is not None and "mean_image" in na["poolings"]:
                s = hidden.index_select(0, r.image_rows).float().sum(0)
                p.image_sums[layer] = p.image_sums[layer] + s if layer in p.image_sums else s
            if r.last_row is not None:
                p.last[layer] = hidden[r.last_row].float()
        if layer == na["layers"][-1]:
            for r in rows:
                if r.done:
                    self._na_finish(pending.pop(r.req_id))
            na["rows"] = []

    def _na_finish(self, p: _Pending) -> None:
        na = self._na
        layers = na["layers"]
        n_image = int(p.image_mask.sum())
        n_image_cached = int(p.image_mask[: p.first_computed].sum())
        vectors: dict[str, torch.Tensor] = {}
        if "last_token" in na["poolings"]:
            vectors["last_token"] = torch.stack([p.last[l] for l in layers]).cpu()
        mean_image_complete = n_image_cached == 0
        if "mean_image" in na["poolings"] and mean_image_complete:
            if n_image:
                vectors["mean_image"] = (torch.stack([p.image_sums[l] for l in layers]) / n_image).cpu()
            else:  # no image in the prompt: zeros, as the transformers backend's masked mean gives
                vectors["mean_image"] = torch.zeros_like(vectors.get("last_token", torch.stack(
                    [p.last[l] for l in layers]).cpu()))
        record = {
            "vectors": vectors, "layers": layers, "num_prompt_tokens": len(p.image_mask),
            "num_cached_tokens": p.first_computed, "num_image_tokens": n_image,
            "complete": mean_image_complete or "mean_image" not in na["poolings"],
        }
        if na["out_dir"]:
            _write_atomic(Path(na["out_dir"]) / f"{p.key}.safetensors", record)
        else:  # JSON-safe, compact: survives both collective_rpc and the HTTP /collective_rpc route
            record["vectors"] = {k: _encode(v) for k, v in vectors.items()}
            na["ready"][p.key] = record


def _decoder_layers(model) -> tuple[torch.nn.ModuleList, torch.nn.Module | None]:
    """The text decoder's layer list and final norm, for the VLM wrappers vLLM builds."""
    lm = model.get_language_model() if hasattr(model, "get_language_model") else model
    inner = getattr(lm, "model", lm)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"cannot find decoder layers on {type(model).__name__}")
    return layers, getattr(inner, "norm", None)


def _image_token_id(hf_cfg) -> int | None:
    """The image-feature token (``image_token_id``, or ``image_token_index`` in LLaVA-OneVision / Gemma 3)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(hf_cfg, name, None)
        if value is not None:
            return int(value)
    return None


def _encode(t: torch.Tensor) -> dict:
    import base64

    return {"shape": list(t.shape), "b64": base64.b64encode(t.float().contiguous().numpy().tobytes()).decode()}


def _write_atomic(path: Path, record: dict) -> None:
    """safetensors file with one tensor per pooling and the record's counters as string metadata."""
    from safetensors.torch import save_file

    meta = {k: json.dumps(v) for k, v in record.items() if k != "vectors"}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({k: v.contiguous() for k, v in record["vectors"].items()}, tmp, metadata=meta)
    os.replace(tmp, path)  # readers never see a partial file

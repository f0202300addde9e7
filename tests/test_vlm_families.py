"""Every model family through the one agent path: a tiny model of each, real frames, real sockets.

For each family (agents/families.py) a tiny model is built offline (agents/tiny.py), the VLM agent runs as
controller in the agent service against the real emulator (ZeroMQ on loopback), and what it sent — the
Action messages' per-action probabilities and the Activation messages' pooled hidden states — must equal
a direct transformers forward of the same prompt on the same frame: the family's own processor
(``load_processor``), ``AutoModelForImageTextToText``, one prompt at a time, unpadded.

Tolerances and why: both sides run float32 on the same weights and processor output; the agent batches the
two conditions left-padded, which changes summation order only (Qwen measured ≤ 1e-6 of the scale). We
allow ``ATOL_REL = 1e-4`` of the vector's largest magnitude and ``PROB_ATOL = 1e-5`` on probabilities, and
check that the two conditions and two layers differ by far more, so agreement is not vacuous.

Then what a user can get wrong by naming a model — another family, labels that are not single tokens, files
that are neither local nor cached — must stop with a one-line :class:`ModelError` (and a one-line CLI error).
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import zmq

from agents.base import FrameRef, Observation
from agents.families import ModelError, image_token_id, load_processor
from agents.prompts import BUILTIN_CONDITIONS, action_labels, build_messages, label_probs
from agents.tiny import FAMILIES, build_tiny
from agents.vlm import VLMAgent, VLMConfig, pool_hidden
from protocols import Action, Activation, Decoder, Frame
from services.agent import AgentService, AgentServiceConfig
from services.plumbing.recording import read_recording
from services.plumbing.transport import TOPIC_ACTION, TOPIC_ACTIVATION, TOPIC_FRAME, free_tcp_endpoint, split_topic

CONDITIONS = ["action", "reasoning"]
ATOL_REL = 1e-4
PROB_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family → tiny model dir, each built once per session on first use."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("families")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(build_tiny(root / family, family))
        return built[family]

    return get


def _sub(endpoint: str, *topics: bytes):
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t)
    sock.connect(endpoint)
    return sock


def _direct(model, processor, prompt: str, images: list[np.ndarray], label_ids, layers, image_id: int):
    """Probabilities over the labels and pooled states of one unpadded forward (the reference)."""
    import torch

    inputs = processor(text=[prompt], images=[list(images)], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    probs = label_probs(out.logits[:, -1, list(label_ids)].numpy())[0]
    mask = (inputs["input_ids"] == image_id).numpy()
    assert mask.sum() > 0, "no image tokens in the reference prompt"
    pooled = pool_hidden([h.numpy() for h in out.hidden_states], mask, layers, ("last_token", "mean_image"))
    return probs, {k: v[0] for k, v in pooled.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_agent_service_equals_a_direct_forward(family, tiny, start_emulator):
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_dir = tiny(family)
    emu = start_emulator(game="ALE/Breakout-v5")
    out_ep = free_tcp_endpoint()
    frames_sub = _sub(emu.cfg.frames_endpoint, TOPIC_FRAME)
    out_sub = _sub(out_ep, TOPIC_ACTIVATION, TOPIC_ACTION)
    agent = VLMAgent(VLMConfig(model=model_dir, conditions=CONDITIONS, activation_dtype="float32"))
    service = AgentService(agent, AgentServiceConfig(
        agent_id="vlm-0", role="controller", frames_endpoint=emu.cfg.frames_endpoint,
        control_endpoint=emu.cfg.control_endpoint, activations_endpoint=out_ep, max_decisions=5, duration_s=120))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", service.run()), daemon=True)
    thread.start()
    frames: dict[int, np.ndarray] = {}
    acts: list[Activation] = []
    actions: list[Action] = []
    dec_f, dec_o = Decoder([Frame]), Decoder([Activation, Action])
    while thread.is_alive() or out_sub.poll(200):
        while frames_sub.poll(5):
            f = dec_f.decode(split_topic(frames_sub.recv_multipart(copy=False))[1])
            frames[f.seq] = np.array(f.pixels)
        while out_sub.poll(5):
            msg = dec_o.decode(split_topic(out_sub.recv_multipart(copy=False))[1])
            (acts if isinstance(msg, Activation) else actions).append(msg)
    thread.join(5)
    frames_sub.close(0)
    out_sub.close(0)
    summary = result["summary"]
    assert summary.decisions >= 5 and summary.illegal_actions == 0 and summary.errors_total == 0, summary
    meanings = tuple(emu.emu.game.action_meanings)
    emu.stop()
    logged = [a for s in read_recording(emu.cfg.record_path).steps for a in s.actions if a.agent_id == "vlm-0"]
    assert logged and all(0 <= a.action < len(meanings) for a in logged)

    # The reference: the family's processor and model, loaded independently, one prompt at a time.
    processor = load_processor(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    hf = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    labels = action_labels(processor.tokenizer, meanings)
    prompts = {c: processor.apply_chat_template(build_messages(BUILTIN_CONDITIONS[c], 1, labels), tokenize=False,
                                                add_generation_prompt=True) for c in CONDITIONS}
    layers = list(range(config.get_text_config().num_hidden_layers + 1))
    ref: dict[tuple[int, str], tuple] = {}
    for seq in sorted({a.frame_seq for a in actions} & set(frames))[:3]:
        for c in CONDITIONS:
            ref[seq, c] = _direct(hf, processor, prompts[c], [frames[seq]], labels.token_ids, layers,
                                  image_token_id(config))
    assert len(ref) >= 2 * len(CONDITIONS), f"too few decisions matched to frames: {sorted(ref)}"
    checked = {"probs": 0, "acts": 0}
    for a in actions:
        if (a.frame_seq, a.condition) in ref:
            want = ref[a.frame_seq, a.condition][0]
            np.testing.assert_allclose(a.probs, want, rtol=0, atol=PROB_ATOL)
            assert a.action == int(np.argmax(want))
            checked["probs"] += 1
    for m in acts:
        key = (m.frame_seqs[-1], m.condition)
        if key in ref:
            want = ref[key][1][m.pooling]
            assert m.layers == layers and m.vectors.shape == want.shape == (len(layers), 128)
            np.testing.assert_allclose(m.vectors, want, rtol=0, atol=ATOL_REL * np.abs(want).max())
            checked["acts"] += 1
    assert checked["probs"] >= 4 and checked["acts"] >= 8, checked

    # Not vacuous: conditions and layers differ by far more than the tolerance.
    (seq, _), = [k for k in ref if k[1] == CONDITIONS[0]][:1]
    a_last, b_last = ref[seq, "action"][1]["last_token"], ref[seq, "reasoning"][1]["last_token"]
    scale = np.abs(a_last).max()
    assert np.abs(a_last[-1] - b_last[-1]).max() > 20 * ATOL_REL * scale
    assert np.abs(a_last[1] - a_last[2]).max() > 20 * ATOL_REL * scale
    assert np.abs(ref[seq, "action"][0] - ref[seq, "reasoning"][0]).max() > 10 * PROB_ATOL

    # Several frames in one decision (the paper feeds 4): the same agent, two frames, against the reference.
    two = [frames[s] for s in sorted(frames)[-2:]]
    obs = Observation(tuple(FrameRef(i, i, p) for i, p in enumerate(two)), meanings)
    d = agent.infer(obs)
    multi = {c: processor.apply_chat_template(build_messages(BUILTIN_CONDITIONS[c], 2, labels), tokenize=False,
                                              add_generation_prompt=True) for c in CONDITIONS}
    for choice in d.choices:
        probs, pooled = _direct(hf, processor, multi[choice.condition], two, labels.token_ids, layers,
                                image_token_id(config))
        np.testing.assert_allclose(choice.probs, probs, rtol=0, atol=PROB_ATOL)
        for s in d.activations:
            if s.condition == choice.condition:
                want = pooled[s.pooling]
                np.testing.assert_allclose(s.vectors, want, rtol=0, atol=ATOL_REL * np.abs(want).max())


def test_unknown_family_is_a_one_line_error(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelError, match=r"model '.*gpt2': family 'gpt2' is not supported"):
        VLMAgent(VLMConfig(model=str(tmp_path / "gpt2")))


def test_labels_that_are_not_single_tokens_are_refused(tiny, tmp_path):
    # Every text gets a prefix before tokenising: "A" becomes two tokens, so no single-token labels remain.
    src = tiny("idefics3")
    bad = tmp_path / "bad-labels"
    shutil.copytree(src, bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Prepend", "prepend": "~"}
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ModelError, match=r"bad-labels': action labels must be distinct single tokens"):
        VLMAgent(VLMConfig(model=str(bad)))


def test_missing_processor_names_the_model(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 40 s of DNS retries
    with pytest.raises(ModelError, match=r"model 'OpenGVLab/InternVL3-8B-hf': its config could not be read"):
        VLMAgent(VLMConfig(model="internvl3-8b"))  # the preset's hub name, not cached here
    with pytest.raises(ModelError, match=r"model '.*nowhere': no such local directory"):
        VLMAgent(VLMConfig(model=str(tmp_path / "nowhere")))
    src = tiny("internvl")
    partial = tmp_path / "no-processor"
    shutil.copytree(src, partial, ignore=shutil.ignore_patterns("preprocessor_config.json", "processor_config.json"))
    with pytest.raises(ModelError, match=r"no-processor': its processor could not be loaded"):
        VLMAgent(VLMConfig(model=str(partial)))


def test_cli_prints_model_errors_in_one_line(tmp_path):
    from transformers import GPT2Config
    from typer.testing import CliRunner

    from neuroarcade.cli import app

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    res = CliRunner().invoke(app, ["agent", "--kind", "vlm", "--model", str(tmp_path / "gpt2"),
                                   "--frames", free_tcp_endpoint(), "--control", free_tcp_endpoint(),
                                   "--activations", ""])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: model '") and "not supported" in lines[0], res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["models", "build-tiny", str(tmp_path / "m"), "--family", "nonsense"])
    assert res.exit_code == 2 and "unknown tiny family 'nonsense'" in res.output


def test_presets_name_the_methods_models_and_their_image_settings_apply(tiny):
    from agents.families import PRESETS
    from agents.vlm import resolve_preset

    cfg = resolve_preset(VLMConfig(model="ui-tars-7b-dpo"))
    assert cfg.model == "ByteDance-Seed/UI-TARS-7B-DPO" and cfg.image_kwargs == PRESETS["ui-tars-7b-dpo"].image_kwargs
    assert resolve_preset(cfg) == cfg  # idempotent: the hub name maps to the same preset
    assert resolve_preset(VLMConfig(model="OS-Copilot/OS-Atlas-Pro-7B", layers=[4, 20])).layers == [4, 20]
    assert resolve_preset(VLMConfig(model="some/other-model")) == VLMConfig(model="some/other-model")
    frame = np.zeros((210, 160, 3), np.uint8)
    # The presets' image settings, applied to tiny models of the same families: tokens per 210×160 frame.
    for family, preset, n_tokens in (("qwen2_5_vl", "qwen2.5-vl-7b", 48), ("internvl", "internvl3-8b", 16)):
        agent = VLMAgent(VLMConfig(model=tiny(family), image_kwargs=dict(PRESETS[preset].image_kwargs)))
        inputs = agent.backend.prepare([frame], agent.prompts(1, ("NOOP", "FIRE")))
        assert int((inputs["input_ids"] == agent.backend.image_token_id).sum()) == n_tokens, family

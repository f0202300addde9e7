"""Per-TR streaming (EncodingCore, no sockets) against the offline predict, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.align import features_per_tr
from encoders.fit import FitConfig, fit_encoding
from encoders.synth import SynthConfig, decisions_for_run, generate, trigger_times_ns
from encoders.weights import EncodingWeights, WeightsError
from protocols import Activation, Decoder, Encoder
from services.encoding import CoreConfig, EncodingCore, InputError

TR = 2.0


@pytest.fixture(scope="module")
def session():
    return generate(SynthConfig(voxel_mm=14, n_runs=3, n_trs=50, space_dim=12, seed=3))


@pytest.fixture(scope="module")
def weights(session, tmp_path_factory) -> EncodingWeights:
    """Two feature spaces (banded ridge) with PCA, saved and reloaded: the most involved path."""
    prov = {s: {"model": "synthetic", "condition": s, "pooling": "mean", "layer": 5} for s in ("action", "reasoning")}
    res = fit_encoding(session.bold[:2], {s: session.features[s][:2] for s in ("action", "reasoning")},
                       FitConfig(pca=6, score=False, banded_iter=3, progress=False),
                       mask=session.mask, affine=session.affine, tr=TR, provenance=prov,
                       roi_labels=session.atlas[session.mask], roi_names=session.roi_names)
    path = res.weights.save(tmp_path_factory.mktemp("w") / "w.safetensors")
    return EncodingWeights.load(path)


def _activations(session, run: int, trig: np.ndarray, layers=(2, 5), model="synthetic"):
    """Activation messages (through the real codec) whose per-TR mean is the run's features."""
    enc, dec = Encoder(), Decoder(accept=[Activation])
    msgs = []
    for k, space in enumerate(("action", "reasoning")):
        vecs, frame_t = decisions_for_run(session.features[space][run], trig, TR, per_tr=3, seed=k)
        for i, (v, t) in enumerate(zip(vecs, frame_t)):
            # layer 2 carries noise: the core must pick the weights' layer (5)
            stacked = np.stack([np.full_like(v, 99.0), v]).astype(np.float32)
            msg = Activation(agent_id="vlm-0", model=model, condition=space, layers=list(layers), pooling="mean",
                             frame_seqs=[i], t_ns=int(t) + 1000, vectors=stacked, frame_t_ns=int(t))
            msgs.append(dec.decode(enc.encode(msg)))
    msgs.sort(key=lambda m: m.frame_t_ns)
    return msgs


def test_alignment_reproduces_rows_and_carries_empty_trs(session):
    X = session.features["action"][0]
    trig = trigger_times_ns(len(X), TR, start_ns=5_000_000_000)
    vecs, frame_t = decisions_for_run(X, trig, TR, per_tr=4)
    rows, counts = features_per_tr(vecs, frame_t, trig, TR)
    np.testing.assert_allclose(rows, X, atol=1e-5)
    assert counts.decisions == 4 * len(X) and counts.empty_trs == 0
    # drop every decision of TR 7 and add one before the scan: TR 7 repeats TR 6, the early one is counted
    keep = (frame_t < trig[7]) | (frame_t >= trig[8])
    rows, counts = features_per_tr(np.r_[vecs[keep], vecs[:1]], np.r_[frame_t[keep], trig[0] - 1], trig, TR)
    np.testing.assert_array_equal(rows[7], rows[6])
    assert counts.empty_trs == 1 and counts.before_scan == 1


def test_streaming_equals_offline_predict(session, weights):
    run = 2
    trig = trigger_times_ns(session.cfg.n_trs, TR, start_ns=10**12)
    core = EncodingCore(weights, CoreConfig(grace_s=0.5))
    msgs = _activations(session, run, trig)
    published = []
    i = 0
    for t, t_ns in enumerate(trig):
        core.on_trigger(t, int(t_ns))
        while i < len(msgs) and msgs[i].frame_t_ns < t_ns + TR * 1e9:
            core.on_activation(msgs[i])
            i += 1
        published += core.tick(int(t_ns) + int(0.6e9))  # closes TR t-1 (trigger t is 0.6 s old)
        vol = session.bold[run][t]
        published += core.on_volume(t, weights.to_volume(vol))
    published += core.finish()
    offline = weights.predict([session.features["action"][run], session.features["reasoning"][run]])
    np.testing.assert_allclose(core.predicted_array(), offline, atol=1e-5)
    assert sorted({p.tr_index for p in published}) == list(range(session.cfg.n_trs))
    final = [p for p in published if p.roi_measured][-1]
    assert final.roi_names[0] == "all" and len(final.roi_scores) == len(final.roi_names)
    # running r of the last message equals r computed from the whole series of ROI means
    pred_all = offline.mean(1)
    meas_all = session.bold[run].mean(1)
    assert final.roi_scores[0] == pytest.approx(np.corrcoef(pred_all, meas_all)[0, 1], abs=1e-4)
    assert not core.errors


def test_bad_inputs_are_rejected_and_the_core_goes_on(session, weights):
    core = EncodingCore(weights)
    trig = trigger_times_ns(4, TR)
    for t, t_ns in enumerate(trig):
        core.on_trigger(t, int(t_ns))
    good = _activations(session, 0, trig)[0]
    cases = {
        "other model": (good.__class__(**{**_fields(good), "model": "other-vlm"}), "feature_mismatch", "model"),
        "other condition": (good.__class__(**{**_fields(good), "condition": "none"}), "feature_mismatch",
                            "condition"),
        "missing layer": (good.__class__(**{**_fields(good), "layers": [2, 3]}), "feature_mismatch", "layer 5"),
        "other dim": (good.__class__(**{**_fields(good), "vectors": np.zeros((2, 99), np.float32)}),
                      "feature_mismatch", "dim 99"),
        "bad shape": (good.__class__(**{**_fields(good), "vectors": np.zeros((3, 12), np.float32)}),
                      "bad_activation", r"shape \(3, 12\)"),
    }
    for name, (msg, kind, words) in cases.items():
        with pytest.raises(InputError, match=words) as err:
            core.on_activation(msg)
        assert err.value.kind == kind, name
        core.reject(err.value)
    with pytest.raises(InputError, match="shape") as err:
        core.on_volume(0, np.zeros((3, 3, 3), np.float32))
    assert err.value.kind == "wrong_shape"
    core.reject(err.value)
    core.on_activation(good)  # still accepted afterwards
    assert core.aligners[0].counts.decisions == 1
    assert core.errors == {"feature_mismatch": 4, "bad_activation": 1, "wrong_shape": 1}
    assert len(core.close_through(1)) == 2


def _fields(msg) -> dict:
    return {f: getattr(msg, f) for f in msg.__struct_fields__}


def test_weights_for_other_features_fail_clearly(session, weights, tmp_path):
    with pytest.raises(WeightsError, match=r"fitted on dim 12 .*model synthetic, layer 5, condition action"):
        weights.predict([np.zeros((5, 30), np.float32), np.zeros((5, 12), np.float32)])
    with pytest.raises(WeightsError, match="expect 2 feature arrays"):
        weights.predict([np.zeros((5, 12), np.float32)])
    bad = tmp_path / "not_weights.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(WeightsError):
        EncodingWeights.load(bad)
    # round trip keeps everything the service needs
    again = EncodingWeights.load(weights.save(tmp_path / "again.safetensors"))
    np.testing.assert_array_equal(again.coef, weights.coef)
    assert [s.layer for s in again.spaces] == [5, 5] and again.roi_names == weights.roi_names
    assert again.spaces[0].pca_components.shape == (6, 12)
    # nibabel hands out Fortran-ordered arrays; safetensors stores raw buffers: the mask must survive
    weights.mask = np.asfortranarray(weights.mask)
    np.testing.assert_array_equal(EncodingWeights.load(weights.save(tmp_path / "f.safetensors")).mask, weights.mask)

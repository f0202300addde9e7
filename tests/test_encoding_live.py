"""Live path end to end over real ZMQ: simulated scanner writes NIfTI files → watchdog FolderSource →
BoldVolume PUB; a simulated agent publishes Activations per trigger; the encoding service predicts,
scores, survives bad input, and writes the predicted 4D NIfTI + scores TSV."""

from __future__ import annotations

import csv
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import zmq

from encoders.fit import FitConfig, fit_encoding
from encoders.synth import SynthConfig, decisions_for_run, generate
from encoders.weights import EncodingWeights
from protocols import Activation, BoldVolume, Decoder, Prediction, Trigger
from services.encoding import CoreConfig, EncodingServiceConfig, run_encoding_service
from services.scanner import FolderSource, SimulatedScannerConfig, TriggerPublisher, publish_stream, \
    run_simulated_scanner
from services.plumbing.transport import TOPIC_ACTIVATION, TOPIC_BOLD, TOPIC_HEARTBEAT, TOPIC_PREDICTION, TOPIC_TRIGGER, \
    bound_endpoint, free_tcp_endpoint, split_topic

pytestmark = pytest.mark.slow  # a fit, then 30 TRs streamed end to end

TR = 2.0
SPEED = 20.0  # 0.1 s per TR
N_TRS = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    s = generate(SynthConfig(voxel_mm=14, n_runs=3, n_trs=N_TRS, space_dim=10, seed=5))
    prov = {"action": {"model": "synthetic", "condition": "action", "pooling": "mean", "layer": None}}
    res = fit_encoding(s.bold[:2], {"action": s.features["action"][:2]}, FitConfig(score=False, progress=False),
                       mask=s.mask, affine=s.affine, tr=TR, provenance=prov,
                       roi_labels=s.atlas[s.mask], roi_names=s.roi_names)
    weights_path = res.weights.save(tmp / "w.safetensors")
    vol = res.weights.to_volume(s.bold[2])  # (x, y, z, T)
    img = nib.Nifti1Image(vol, s.affine)
    img.header["pixdim"][4] = TR
    bold_path = tmp / "run-3_bold.nii.gz"
    nib.save(img, bold_path)
    return s, EncodingWeights.load(weights_path), weights_path, bold_path, tmp


def _agent(ctx, pub: TriggerPublisher, trig_ep, features, stop, ready):
    """Publishes 3 decisions per TR once the TR is over (the next trigger arrived), plus some bad input.

    Their frame times lie inside the TR as it really was, between its trigger and the next: on a
    loaded machine the simulated scanner's triggers come late or catch up, so a TR is not always
    TR / SPEED long, and frame times placed by the nominal length could fall into the next TR.
    """
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, TOPIC_TRIGGER)
    sub.connect(trig_ep)
    dec = Decoder(accept=[Trigger])
    triggers: dict[int, int] = {}

    def publish_tr(k: int, span_s: float) -> None:
        vecs, frame_t = decisions_for_run(features[k:k + 1], np.array([triggers[k]]), span_s, seed=k)
        for i, (v, t) in enumerate(zip(vecs, frame_t)):
            pub.send(Activation(agent_id="vlm-0", model="synthetic", condition="action", layers=[12],
                                pooling="mean", frame_seqs=[3 * k + i], t_ns=time.monotonic_ns(),
                                vectors=v[None], frame_t_ns=int(t)), TOPIC_ACTIVATION)

    if pub.wait_for_subscribers(1, 120, topic=TOPIC_ACTIVATION):
        ready.set()
    try:
        while not stop.is_set():
            if not sub.poll(50):
                continue
            trig = dec.decode(split_topic(sub.recv_multipart())[1])
            k = trig.tr_index
            triggers[k] = trig.t_ns
            if k - 1 in triggers and k - 1 < len(features):  # TR k-1 ended at this trigger
                publish_tr(k - 1, (trig.t_ns - triggers[k - 1]) / 1e9)
            if k == len(features) - 1:  # the last TR: no trigger ends it, the encoder closes it TR / SPEED later
                publish_tr(k, TR / SPEED)
            if k == 3:  # bad input, mid-run
                pub.sock.send_multipart([TOPIC_ACTIVATION, b"\x93not-a-map"])
                pub.send(Activation(agent_id="vlm-0", model="synthetic", condition="action", layers=[12],
                                    pooling="mean", frame_seqs=[0], t_ns=0, vectors=np.zeros((1, 99), np.float32),
                                    frame_t_ns=trig.t_ns + 1), TOPIC_ACTIVATION)
                pub.send(BoldVolume(run="x", tr_index=k, acq_time_s=0.0, t_ns=0, affine=[0.0] * 16,
                                    data=np.zeros((4, 4, 4), np.int16)), TOPIC_BOLD)
    finally:
        sub.close()
        pub.close()


def test_live_path_end_to_end(setup):
    s, weights, weights_path, bold_path, tmp = setup
    ctx = zmq.Context()
    act_pub = TriggerPublisher(ctx, "tcp://127.0.0.1:*")  # the agent's activation PUB, handed to its thread
    act_ep = bound_endpoint(act_pub.sock)
    trig_ep, bold_ep, pred_ep = (free_tcp_endpoint() for _ in range(3))  # bound by the services from their configs
    folder = tmp / "export"
    folder.mkdir()
    # a truncated file already sits in the export folder: reported, skipped, the run goes on
    (folder / "vol_09999.nii").write_bytes(b"\x5c\x01\x00\x00" + b"\x00" * 100)
    stop_agent = threading.Event()
    agent_ready = threading.Event()
    agent = threading.Thread(target=_agent, args=(ctx, act_pub, trig_ep, s.features["action"][2], stop_agent,
                                                  agent_ready))
    agent.start()

    preds_sub = ctx.socket(zmq.SUB)
    preds_sub.setsockopt(zmq.SUBSCRIBE, TOPIC_PREDICTION)
    preds_sub.setsockopt(zmq.SUBSCRIBE, TOPIC_HEARTBEAT)
    preds_sub.connect(pred_ep)
    report_box = []
    # grace_s: how long after trigger t+1 the activations of TR t may still arrive. Generous, so that a loaded
    # machine delaying the agent thread cannot make an activation late (and the prediction differ from offline).
    cfg = EncodingServiceConfig(weights=str(weights_path), activations=[act_ep], bold=[bold_ep, trig_ep],
                                predictions=pred_ep, out_dir=str(tmp / "out"), n_trs=N_TRS, idle_timeout_s=60,
                                status_s=0.1, core=CoreConfig(tr_s=TR / SPEED, grace_s=3.0, send_voxels=True))
    service = threading.Thread(target=lambda: report_box.append(run_encoding_service(cfg, ctx=ctx)))
    service.start()
    assert agent_ready.wait(120), "the encoder never subscribed to the agent"
    # Subscriptions reach the PUB in order: the encoder's Status arriving means our prediction subscription
    # is in place before the first TR can close.
    assert preds_sub.poll(120_000) and split_topic(preds_sub.recv_multipart())[0] == TOPIC_HEARTBEAT

    # missing_after_s: a volume is declared missing this long after a later one was read; generous for the
    # same reason (the run has no missing volume)
    src = FolderSource(folder, tr=TR / SPEED, n_volumes=N_TRS, settle_s=0.01, partial_timeout_s=1.0,
                       missing_after_s=10.0)
    publisher = threading.Thread(target=publish_stream, args=(src, bold_ep, ctx), kwargs={"wait_subscribers": 1})
    publisher.start()
    sim_cfg = SimulatedScannerConfig(bold=str(bold_path), folder=str(folder), speed=SPEED, trigger_endpoint=trig_ep,
                                     wait_subscribers=2)
    sim = threading.Thread(target=run_simulated_scanner, args=(sim_cfg, ctx))
    sim.start()

    received: list[Prediction] = []
    dec = Decoder(accept=[Prediction])
    while service.is_alive() or preds_sub.poll(0):
        if preds_sub.poll(100):
            topic, parts = split_topic(preds_sub.recv_multipart())
            if topic == TOPIC_PREDICTION:
                received.append(dec.decode(parts))
    stop_agent.set()
    for th in (sim, publisher, agent, service):
        th.join(timeout=60)
        assert not th.is_alive()
    preds_sub.close()
    ctx.term()

    report = report_box[0]
    assert report.trs_predicted == N_TRS and report.trs_scored == N_TRS
    assert report.errors == {"feature_mismatch": 1, "wrong_shape": 1}
    assert "dim 99" in report.first_errors["feature_mismatch"] and "(4, 4, 4)" in report.first_errors["wrong_shape"]
    assert report.rejected_messages == 1
    assert [e.kind for e in src.events] == ["partial"]

    # the streamed prediction equals the offline one
    offline = weights.predict([s.features["action"][2]])
    pred_img = nib.load(report.outputs[0])
    vol = np.asarray(pred_img.dataobj)
    assert vol.shape == s.mask.shape + (N_TRS,)
    np.testing.assert_allclose(vol[s.mask].T, offline, atol=1e-5)
    assert np.all(vol[~s.mask] == 0)

    # scores: the running r of the ROI means is the r of the whole series
    with open(report.outputs[1]) as f:
        rows = {r["roi"]: r for r in csv.DictReader(f, delimiter="\t") if r["kind"] == "roi_mean"}
    expected = np.corrcoef(offline.mean(1), s.bold[2].mean(1))[0, 1]
    assert float(rows["all"]["r"]) == pytest.approx(expected, abs=1e-4)
    assert float(rows["all"]["n_trs"]) == N_TRS and set(rows) == {"all", *s.roi_names.values()}
    final = [p for p in received if p.roi_measured and p.tr_index == N_TRS - 1]
    assert final and final[-1].roi_scores[0] == pytest.approx(expected, abs=1e-4)
    assert {p.tr_index for p in received} == set(range(N_TRS))
    by_tr = {p.tr_index: p.voxels for p in received}  # send_voxels: the whole-mask prediction travels too
    np.testing.assert_allclose(np.stack([by_tr[t] for t in range(N_TRS)]), offline, atol=1e-5)

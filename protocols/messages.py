"""Typed wire messages of neuroarcade, protocol version 1.

Every message is a msgspec Struct encoded as a msgpack *map* whose ``kind`` field names the
message type and whose ``v`` field carries the protocol version. Numpy array fields never
travel inside the map: the map holds an array reference ``{"dtype", "shape", "buf"}`` and the
bytes follow as their own ZMQ frame (see ``protocols/codec.py`` and ``PROTOCOL.md``).

All ``*_ns`` fields are integer nanoseconds. ``t_*_ns`` fields stamped by the emulator are on
its monotonic clock (``time.monotonic_ns``); ``wall_ns`` fields are Unix epoch nanoseconds.
"""

from __future__ import annotations

from typing import Union

import msgspec
import numpy as np

PROTOCOL_VERSION = 1


class _Message(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=False, gc=False):
    # gc=False: messages are plain data that never form reference cycles, so the cycle collector
    # need not track the thousands created per second (cheaper allocation, fewer collections).
    v: int = PROTOCOL_VERSION


# --- session control (client <-> emulator ROUTER) ---------------------------------------------


class Hello(_Message, tag="hello"):
    """First message a client sends to a service's ROUTER socket; answered by Welcome or Error."""

    client_id: str
    """Unique, stable name of the client (e.g. ``"vlm-0"``); used in logs and recordings."""
    role: str = "observer"
    """``"controller"`` asks to drive the game; ``"observer"`` only watches (its actions are logged)."""
    model: str = ""
    """Model name or path the client runs, for provenance."""
    conditions: list[str] = []
    """Prompt conditions the client runs (e.g. ``["action", "reasoning"]``)."""
    pid: int = 0
    """Operating-system process id, for operators."""


class Welcome(_Message, tag="welcome"):
    """The emulator's answer to Hello: who controls, what the game is, what the frames look like."""

    session_id: str
    client_id: str
    role: str
    """Role granted: ``"controller"`` or ``"observer"`` (controller asked while taken → observer)."""
    mode: str
    """``"realtime"``, ``"lockstep"`` or ``"replay"``."""
    game: str
    action_meanings: list[str]
    """Legal actions; an Action's ``action`` indexes this list."""
    frame_shape: list[int]
    frameskip: int
    repeat_action_probability: float
    step_hz: float
    """Nominal frame rate of the stream in realtime mode (60 / frameskip)."""
    heartbeat_s: float
    """Clients should send a Heartbeat at least this often; 3 missed beats = gone."""
    last_seq: int
    """Sequence number of the newest frame published (-1 before the first)."""
    t_ns: int
    """Emulator monotonic clock at the time of the reply."""
    frame_hash_algo: str = "xxh64"
    """Algorithm of Frame.frame_hash: ``"xxh64"`` (a replay keeps its recording's, maybe ``"xxh3_128"``)."""


class Heartbeat(_Message, tag="heartbeat"):
    """Liveness beacon. Sent by clients to a ROUTER and echoed back; also published by services."""

    sender: str
    seq: int = 0
    t_ns: int = 0
    """Sender's monotonic clock."""
    member: bool = True
    """In the emulator's echo: False when the sender is not a joined client (a health probe, or a
    client dropped after 3 silent beats, e.g. one that was frozen): such a client must say Hello again."""


class Bye(_Message, tag="bye"):
    """A client leaving cleanly; frees the controller slot immediately."""

    client_id: str


class Error(_Message, tag="error"):
    """Rejection of a message. ``code`` is one of the ``ErrorCode`` constants."""

    code: str
    detail: str
    ref_kind: str = ""
    """Kind of the message that was rejected, when it could be read."""


class ErrorCode:
    BAD_HEADER = "bad_header"
    """Not a msgpack map, or a field has the wrong type or is missing."""
    BAD_VERSION = "bad_version"
    UNKNOWN_KIND = "unknown_kind"
    BAD_PAYLOAD = "bad_payload"
    """Array reference and data frame disagree: length, dtype, shape, frame count."""
    ILLEGAL_ACTION = "illegal_action"
    NOT_ALLOWED = "not_allowed"
    """Well-formed but not accepted here (wrong socket, unknown client, …)."""


class Status(_Message, tag="status"):
    """Periodic service report, published on topic ``heartbeat`` (liveness + counters)."""

    service: str
    session_id: str
    t_ns: int
    seq: int = -1
    """Newest frame sequence number (emulator) or TR index (scanner/encoder)."""
    steps: int = 0
    received: int = 0
    sent: int = 0
    rejected: int = 0
    """Messages rejected as malformed or not allowed since start."""
    rejected_by_code: dict[str, int] = {}
    clients: dict[str, str] = {}
    """client_id → role of the clients currently known."""
    triggers: int = 0


# --- game stream (emulator PUB) ----------------------------------------------------------------


class Frame(_Message, tag="frame"):
    """One emulator step: the screen after applying ``action`` to the previous frame."""

    session_id: str
    seq: int
    """Frame sequence number within the session, from 0, strictly increasing."""
    episode: int
    step: int
    """Step within the episode (0 = the frame right after reset)."""
    action: int
    """Action applied to produce this frame (-1 for a reset frame)."""
    controller: str
    """Client whose action was applied ('' = held/default/recorded)."""
    reward: float
    terminated: bool
    truncated: bool
    t_ns: int
    """Emulator monotonic clock when the frame was published."""
    wall_ns: int
    pixels: np.ndarray
    """uint8 (height, width, 3) RGB screen."""
    frame_hash: str = ""
    """Hex digest of ``pixels`` with Welcome.frame_hash_algo; replay and clients may check it."""
    pooled_gray: np.ndarray | None = None
    """uint8 (height, width): per pixel, the max of the ALE palette grayscale of the last two
    emulator frames of this step (of the reset screen for a reset frame). Atari sprites flicker
    between frames; RL agents are trained on this max (ale-py's vector env, Gymnasium's
    AtariPreprocessing). Not covered by ``frame_hash``."""


class Action(_Message, tag="action"):
    """An agent's decision for a frame. The controller's is applied; observers' are logged."""

    agent_id: str
    frame_seq: int
    """Sequence number of the frame the decision was made on."""
    action: int
    probs: list[float] = []
    """Per-action probabilities, indexed as Welcome.action_meanings (may be empty)."""
    condition: str = ""
    """Prompt condition that produced the decision (VLM agents)."""
    t_sent_ns: int = 0
    """Agent's monotonic clock when sent (informational: clocks differ between processes)."""
    latency_ns: int = 0
    """Agent-measured time from frame receipt to decision."""


class Trigger(_Message, tag="trigger"):
    """A scanner TR pulse, recorded by the emulator so that frames map to TRs."""

    tr_index: int
    t_ns: int = 0
    """Sender's monotonic clock (the emulator stamps its own receive time too)."""
    source: str = ""
    """Where the pulse came from: ``"keyboard"`` (the participant's page), ``"serial"`` (a sync box's serial
    line), ``"simulated"``, ``"replay"``, ``"folder"`` (fallback: one TR before the volume's arrival in the
    export folder); '' = the sending client's id."""
    host_clock: bool = False
    """``t_ns`` is on the emulator host's ``CLOCK_MONOTONIC``, stamped where the pulse arrived (the dashboard
    server, the serial reader): the emulator records ``t_ns`` instead of its own receipt time, if it is not in
    the future and at most ``TRIGGER_MAX_AGE_S`` old (else its receipt time)."""


TRIGGER_MAX_AGE_S = 60.0
"""A ``host_clock`` trigger stamp older than this (or in the future) is replaced by the receipt time."""


# --- agents → encoder (agent PUB) --------------------------------------------------------------


class Activation(_Message, tag="activation"):
    """Pooled hidden states an agent computed for one decision."""

    agent_id: str
    model: str
    condition: str
    layers: list[int]
    """Layer index of each row of ``vectors`` (0 = embeddings for transformers)."""
    pooling: str
    """e.g. ``"last_token"``, ``"mean_image"``, ``"penultimate"``."""
    frame_seqs: list[int]
    """Frames covered by the input (a frame window has several)."""
    t_ns: int
    """Agent's monotonic clock when the activations were ready."""
    vectors: np.ndarray
    """float32 or float16, shape (len(layers), dim)."""
    frame_t_ns: int = 0
    """Emulator time stamp of the newest frame covered (emulator clock; aligns to TRs)."""


# --- scanner → encoder (scanner PUB) -----------------------------------------------------------


class BoldVolume(_Message, tag="bold"):
    """One fMRI volume."""

    run: str
    tr_index: int
    acq_time_s: float
    """Acquisition time from the run start, seconds."""
    t_ns: int
    """Publisher's monotonic clock when sent."""
    affine: list[float]
    """4×4 voxel→world affine, row-major (16 numbers)."""
    data: np.ndarray
    """3D volume (x, y, z); int16/float32 typically."""
    source: str = ""
    """File the volume came from, or ``"recorded"``/``"simulated"``."""


# --- encoder → sinks (encoder PUB) -------------------------------------------------------------


class Prediction(_Message, tag="prediction"):
    """Predicted BOLD for one TR for one feature stream, with running scores."""

    agent_id: str
    condition: str
    tr_index: int
    t_ns: int
    roi_names: list[str]
    roi_predicted: list[float]
    """Mean predicted BOLD per ROI (z-units)."""
    roi_measured: list[float] = []
    """Mean measured BOLD per ROI for the same TR (empty if not yet arrived)."""
    roi_scores: list[float] = []
    """Running Pearson r per ROI over the TRs so far."""
    voxels: np.ndarray | None = None
    """Optional float32 whole-mask prediction (n_voxels,)."""


class VolumeQuality(_Message, tag="quality"):
    """What the encoder's preprocessing did with one measured volume (published on topic ``quality``)."""

    agent_id: str
    """The publishing encoder's stream, as in its Prediction messages."""
    condition: str
    tr_index: int
    t_ns: int
    """Encoder's monotonic clock when published."""
    params: list[float] = []
    """Rigid motion relative to the session's reference volume: trans_x/y/z (mm), rot_x/y/z (radians);
    empty when the weights record no preprocessing."""
    fd_mm: float = float("nan")
    """Framewise displacement (Power, 50 mm sphere), mm; NaN when undefined."""
    std_dvars: float = float("nan")
    """DVARS relative to the usual DVARS so far; NaN early."""
    excluded: bool = False
    """Not scored (censored for FD or DVARS, warm-up, unusable)."""
    reason: str = ""
    """Why it was excluded, for people ('' when scored; several joined by "; "), e.g. ``FD 1.20 mm > 0.9 mm``,
    ``warm-up``."""
    excluded_total: int = 0
    """Volumes excluded so far in the session."""
    volumes: int = 0
    """Volumes processed so far in the session."""
    preprocess_ms: float = float("nan")
    """Preprocessing of this volume (realignment, reslice, GLM, standardisation), ms."""
    process_ms: float = float("nan")
    """The encoder's whole handling of this volume (preprocessing, ROI means, scoring), ms."""
    aligned: int = -1
    """The session's registration to the weights' space (once per session, at its first volume): 1 registered,
    0 failed (every volume is then excluded), -1 none: not yet (``registration`` '') or never (``registration``
    says why: no weights reference, alignment off)."""
    registration: str = ""
    """That registration for people, e.g. ``aligned: 3.21 mm, 2.05°, match r 0.962`` or ``NOT aligned: poor
    match to the reference (r = 0.41 < 0.7)``; '' before it."""
    align_mm: float = float("nan")
    """Translation of the session reference to the weights' reference, mm (length of the vector); NaN without."""
    align_deg: float = float("nan")
    """Rotation of that registration, degrees (angle); NaN without."""
    align_match_r: float = float("nan")
    """Correlation of the aligned session reference with the weights' reference; NaN without."""
    overlay_png: bytes = b""
    """The alignment overlay (the weights' reference in grey, the aligned session reference as contours), a
    downscaled PNG of a few tens of kB (at most ``OVERLAY_MAX_BYTES``), sent ONCE: in the quality message of the
    volume whose processing completed the registration; empty in every other message."""


OVERLAY_MAX_BYTES = 256 * 1024
"""``VolumeQuality.overlay_png`` is never larger (a sender drops a larger one; a receiver ignores it)."""


Message = Union[Hello, Welcome, Heartbeat, Bye, Error, Status, Frame, Action, Trigger, Activation, BoldVolume, Prediction,
                VolumeQuality]
MESSAGE_TYPES: tuple[type, ...] = Message.__args__  # type: ignore[attr-defined]
KINDS: dict[str, type] = {t.__struct_config__.tag: t for t in MESSAGE_TYPES}

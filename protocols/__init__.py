"""neuroarcade wire protocol: typed messages and a zero-copy multipart codec.

Depends on numpy and msgspec only; nothing else of neuroarcade. See PROTOCOL.md.
"""

from .codec import ALLOWED_DTYPES, Decoder, Encoder, ProtocolError
from .messages import (
    KINDS,
    PROTOCOL_VERSION,
    Action,
    Activation,
    BoldVolume,
    Bye,
    Error,
    ErrorCode,
    Frame,
    Heartbeat,
    Hello,
    Message,
    Prediction,
    Status,
    TRIGGER_MAX_AGE_S,
    Trigger,
    VolumeQuality,
    Welcome,
)

__all__ = [
    "ALLOWED_DTYPES", "Decoder", "Encoder", "ProtocolError", "KINDS", "PROTOCOL_VERSION", "Action",
    "Activation", "BoldVolume", "Bye", "Error", "ErrorCode", "Frame", "Heartbeat", "Hello", "Message",
    "Prediction", "Status", "TRIGGER_MAX_AGE_S", "Trigger", "VolumeQuality", "Welcome",
]

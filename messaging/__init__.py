"""The wire protocol: the one place that knows frames, channels and message shapes.

Components import from here and never build frames themselves. This package imports
no eventlet and no component, so the balancer can hand it green sockets and the
controller plain ones.
"""
from messaging.channels import CHANNELS, PROTOCOL_VERSION, Channel
from messaging.envelope import Message, decode, encode, recv, send
from messaging.errors import BerthError

__all__ = [
    "CHANNELS", "PROTOCOL_VERSION", "Channel", "Message", "decode", "encode",
    "recv", "send", "BerthError",
]

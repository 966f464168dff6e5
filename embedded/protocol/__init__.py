"""The sparsefl serial protocol: COBS framing, typed payloads, a reliable link.

* :mod:`embedded.protocol.framing` — frame header, CRC32, COBS with a ``0x00`` delimiter, a
  resynchronising stream decoder with a bounded buffer.
* :mod:`embedded.protocol.messages` — message type numbers, the typed payload encoding (no
  pickle, no eval) and per-message field schemas.
* :mod:`embedded.protocol.transport` — :class:`~embedded.protocol.transport.Link` over a
  pyserial-like stream: requests with retries, chunked transfers with a sliding window,
  HELLO version negotiation and HMAC pairing.

Byte layouts: ``docs/protocol.md``.
"""

from __future__ import annotations

from .framing import MAX_PAYLOAD, PROTOCOL_VERSION, Frame, FrameDecoder, FrameError
from .messages import ERR, MSG, PayloadError, decode_payload, encode_payload
from .transport import Link, LinkError, RemoteError

__all__ = [
    "ERR", "MAX_PAYLOAD", "MSG", "PROTOCOL_VERSION", "Frame", "FrameDecoder", "FrameError", "Link",
    "LinkError", "PayloadError", "RemoteError", "decode_payload", "encode_payload",
]

"""Versioned wire formats (protobuf) and their validating encode/decode."""

from fedlayer.proto.wire import (
    FORMAT_VERSION,
    DecodedUpdate,
    WireFormatError,
    decode_update,
    encode_update,
)

__all__ = ["FORMAT_VERSION", "DecodedUpdate", "WireFormatError", "decode_update", "encode_update"]

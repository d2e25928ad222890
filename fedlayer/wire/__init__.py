"""Everything that defines what crosses the wire between the two halves.

records.py     record names and config keys both sides use
tensors.py     the codec stage's coded tensors (b-bit differences from a shared reference)
quantize.py bitpack.py   the quantiser and the bit packing under both tensor formats
laq_proto.py laq_codec.py proto/   LAQ's versioned protobuf update and its codec

Only modules here encode or decode tensors for the wire (tests/test_architecture.py).
"""

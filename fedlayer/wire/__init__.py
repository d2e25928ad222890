"""Everything that defines what crosses the wire between the two halves.

records.py     record names and config keys both sides use
tensors.py     the one quantised-tensor format (``fedlayer.delta.v1``: a Flower Array per
               tensor, b-bit differences from a shared reference), used by the codec stage
               and by LAQ (whose update is these Arrays plus three scalars, methods/laq.py)
quantize.py bitpack.py   the LAQ grid quantiser and the bit packing under it (private to wire/)
levers.py      the codec's levers on that format: 1-bit block scales, top-k with index coding, zstd
messages.py    typed messages: a method's dataclass down and up <-> ConfigRecord / MetricRecord entries

Only modules here encode or decode tensors for the wire (tests/test_architecture.py).
"""

"""Pure (numpy-only) compression layer: LAQ quantization, bit packing, codecs."""

from fedlayer.compression.bitpack import pack_codes, packed_nbytes, unpack_codes
from fedlayer.compression.codec import (
    EncodedTensor,
    EncodeReport,
    LAQCodec,
    innovation_norm_sq,
)
from fedlayer.compression.quantize import (
    QuantizedTensor,
    dequantize,
    quantization_error,
    quantize_innovation,
)

__all__ = [
    "EncodeReport",
    "EncodedTensor",
    "LAQCodec",
    "QuantizedTensor",
    "dequantize",
    "innovation_norm_sq",
    "pack_codes",
    "packed_nbytes",
    "quantization_error",
    "quantize_innovation",
    "unpack_codes",
]

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QuantizedTensor(_message.Message):
    __slots__ = ("name", "shape", "bits", "radius", "packed_codes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    RADIUS_FIELD_NUMBER: _ClassVar[int]
    PACKED_CODES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    bits: int
    radius: float
    packed_codes: bytes
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., bits: _Optional[int] = ..., radius: _Optional[float] = ..., packed_codes: _Optional[bytes] = ...) -> None: ...

class CompressedUpdate(_message.Message):
    __slots__ = ("format_version", "skip", "tensors", "client_clock", "quantization_error")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CLOCK_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    skip: bool
    tensors: _containers.RepeatedCompositeFieldContainer[QuantizedTensor]
    client_clock: int
    quantization_error: float
    def __init__(self, format_version: _Optional[int] = ..., skip: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[QuantizedTensor, _Mapping]]] = ..., client_clock: _Optional[int] = ..., quantization_error: _Optional[float] = ...) -> None: ...

"""Import torchvision lazily, tolerating a CUDA-linked build next to a CPU torch.

The torchvision 0.28.0 wheel is linked against CUDA; with the CPU build of torch
its C++ operators do not register, and ``import torchvision`` fails with
"operator torchvision::nms does not exist" because its Python side registers
fake kernels for ops whose schema was never defined. Defining the two op
schemas first lets the pure-Python parts (datasets, transforms) import. This is
the only place fedlayer works around it, and only when the plain import fails.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library_handle: object | None = None  # keeps the schema definitions alive


def _define_missing_schemas() -> None:
    global _library_handle
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        lib.define(schema)
    _library_handle = lib


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, patching op schemas only if needed."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _define_missing_schemas()
    return importlib.import_module("torchvision")

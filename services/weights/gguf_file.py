"""GGUF files in city96's ComfyUI-GGUF convention: tensors by name, quantized ones kept as raw blocks.

Tensors reshaped for quantization carry their logical shape in `comfy.gguf.orig_shape.<key>`; F32/F16
tensors come back as plain tensors, every other type as a `QuantizedWeight` (precision.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import torch

from luna_stack.weights.precision import GGUF_PLAIN_TYPES, QuantizedWeight

ORIG_SHAPE_FIELD = "comfy.gguf.orig_shape."
GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def _orig_shape(reader: gguf.GGUFReader, name: str) -> torch.Size | None:
    fld = reader.get_field(ORIG_SHAPE_FIELD + name)
    if fld is None:
        return None
    return torch.Size(int(fld.parts[i][0]) for i in fld.data)


Tensors = dict[str, "torch.Tensor | QuantizedWeight"]


def read_gguf(path: Path, strip_prefix: str = "") -> tuple[Tensors, str | None]:
    """GGUF tensors by name (`strip_prefix` removed where present) and the file's `general.architecture`."""
    reader = gguf.GGUFReader(str(path))
    arch_field = reader.get_field("general.architecture")
    arch = str(arch_field.parts[arch_field.data[-1]], encoding="utf-8") if arch_field else None
    sd: Tensors = {}
    for t in reader.tensors:
        name = t.name.removeprefix(strip_prefix)
        shape = _orig_shape(reader, t.name) or torch.Size(int(v) for v in reversed(t.shape))
        with warnings.catch_warnings():  # the reader's arrays are read-only views of the mmap; we copy
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(np.array(t.data))
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype in GGUF_PLAIN_TYPES:
            sd[name] = data.view(GGUF_PLAIN_TYPES[qtype]).reshape(shape)
        else:
            sd[name] = QuantizedWeight(data.view(torch.uint8), qtype, shape)
    return sd, arch

"""The record format of `data.convert`'s ArrayRecord files, read by the
`array_record` source: [4-byte header length][JSON header: label][image bytes].

Its own module so that the source (reading) and the converter (writing, which
builds sources) don't import each other.
"""
from __future__ import annotations

import io
import json
import struct

import numpy as np
from PIL import Image


def encode_record(element: dict) -> bytes:
  """[4-byte header length][JSON header: label][encoded image bytes]."""
  image = element["image"]
  if not isinstance(image, (bytes, np.bytes_)):
    array = np.asarray(image)
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1
                    else array).save(buf, format="PNG")
    image = buf.getvalue()
  header = json.dumps({"label": int(element["label"])}).encode()
  return struct.pack("<I", len(header)) + header + bytes(image)


def decode_record(record: bytes) -> dict:
  (length,) = struct.unpack("<I", record[:4])
  header = json.loads(record[4:4 + length])
  return {"image": record[4 + length:], "label": np.int32(header["label"])}

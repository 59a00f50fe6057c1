"""Text -> fixed-length int32 token ids for image-text (CLIP/SigLIP) training.

Every encoding is laid out the same way: the text's ids, then EOS, then pad
(0) up to `max_len`. Texts are truncated so the EOS always fits, and no text
id is 0, so a model can pool at `(tokens != 0).sum(-1) - 1`: always the EOS.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from big_vision_like.registry import ConfigError

TOKENIZER_NAMES = ("bytes", "sentencepiece")
SPEC_FIELDS = ("name", "max_len", "path")


class Tokenizer:
  """The interface: `encode` one text, `encode_batch` many, `decode` back."""
  vocab_size: int
  max_len: int
  pad_id: int = 0
  eos_id: int

  def text_ids(self, text: str, limit: int) -> list[int]:
    """The ids of `text` (never 0), at most `limit` of them."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    """The text of one encoding, up to its EOS."""
    raise NotImplementedError

  def encode(self, text: str) -> np.ndarray:
    """int32 [max_len]: ids, EOS, then padding."""
    ids = self.text_ids(str(text), self.max_len - 1) + [self.eos_id]
    out = np.full(self.max_len, self.pad_id, np.int32)
    out[:len(ids)] = ids
    return out

  def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [len(texts), max_len]."""
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for i, text in enumerate(texts):
      out[i] = self.encode(text)
    return out

  def _until_eos(self, ids: Sequence[int]) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(self.eos_id)] if self.eos_id in ids else ids


def _check_max_len(max_len: Any, field: str) -> int:
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
    raise ConfigError(f"{field}.max_len={max_len!r} must be an int >= 2 "
                      "(room for a token and the EOS)")
  return int(max_len)


class BytesTokenizer(Tokenizer):
  """UTF-8 bytes, no files needed: byte b -> b + 3; 0 = pad, 1 = bos (unused), 2 = eos.

  The text is kept as is (no lower-casing). Truncation never splits a
  multi-byte character, so every encoding decodes to valid UTF-8.
  """
  vocab_size = 256 + 3
  bos_id = 1
  eos_id = 2
  OFFSET = 3

  def __init__(self, max_len: int = 32):
    self.max_len = _check_max_len(max_len, "tokenizer")

  def text_ids(self, text: str, limit: int) -> list[int]:
    data = text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")
    return [b + self.OFFSET for b in data]

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(i - self.OFFSET for i in self._until_eos(ids) if i >= self.OFFSET)
    return data.decode("utf-8", "replace")


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model: id = sentencepiece id + 1, so 0 stays padding.

  EOS is the model's own eos piece (+1) when it has one; a model trained
  without one (eos_id = -1) gets an extra id at the end of the vocabulary:
  vocab_size = pieces + 2 and eos_id = pieces + 1. The model is kept as bytes
  so the tokenizer pickles into grain worker processes.
  """

  def __init__(self, path: str, max_len: int = 32):
    self.max_len = _check_max_len(max_len, "tokenizer")
    self.path = str(path)
    try:
      with open(self.path, "rb") as f:
        self._proto = f.read()
    except OSError as e:
      raise ConfigError(f"cannot read sentencepiece model {self.path!r}: "
                        f"{e.strerror or e}") from None
    self._load()
    pieces = self._sp.get_piece_size()
    if self._sp.eos_id() >= 0:
      self.vocab_size, self.eos_id = pieces + 1, self._sp.eos_id() + 1
    else:
      self.vocab_size, self.eos_id = pieces + 2, pieces + 1

  def _load(self):
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConfigError("the sentencepiece tokenizer needs the sentencepiece "
                        "package: pip install 'big_vision_like[sentencepiece]'") from None
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError by version
      raise ConfigError(f"{self.path!r} is not a sentencepiece model: {e}") from None

  def text_ids(self, text: str, limit: int) -> list[int]:
    return [i + 1 for i in self._sp.encode(text, out_type=int)[:limit]]

  def decode(self, ids: Sequence[int]) -> str:
    pieces = self._sp.get_piece_size()
    return self._sp.decode([i - 1 for i in self._until_eos(ids) if 0 < i <= pieces])

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_sp"]  # the C++ processor does not pickle; rebuilt from the bytes
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()


@functools.lru_cache(maxsize=16)
def _cached(name: str, max_len: int, path: str) -> Tokenizer:
  if name == "bytes":
    return BytesTokenizer(max_len)
  return SentencePieceTokenizer(path, max_len)


def build_tokenizer(spec: Any, field: str = "config.input.tokenizer") -> Tokenizer:
  """The tokenizer of a spec {name: 'bytes' | 'sentencepiece', max_len=32, path}."""
  spec = dict(spec)
  unknown = sorted(set(spec) - set(SPEC_FIELDS))
  if unknown:
    raise ConfigError(f"{field}.{unknown[0]} is not a tokenizer field; "
                      f"valid fields: {', '.join(SPEC_FIELDS)}")
  name = spec.get("name")
  if name not in TOKENIZER_NAMES:
    raise ConfigError(f"{field}.name={name!r} is not a known tokenizer; "
                      f"valid names: {', '.join(TOKENIZER_NAMES)}")
  max_len = _check_max_len(spec.get("max_len", 32), field)
  path = str(spec.get("path") or "")
  if name == "sentencepiece" and not path:
    raise ConfigError(f"{field}.path must name the sentencepiece model file")
  try:
    return _cached(name, max_len, path if name == "sentencepiece" else "")
  except ConfigError as e:
    raise ConfigError(f"{field}: {e}") from None

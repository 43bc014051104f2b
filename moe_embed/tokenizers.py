"""One tokenizer interface over SentencePiece models and Hugging Face tokenizer.json.

`encode` adds the model's special tokens (<s> ... </s> or [CLS] ... [SEP]) and
truncates; `pad` turns id lists into fixed arrays. Kinds:
- a SentencePiece model trained by `train_sentencepiece` (pad=0, unk=1, <s>=2, </s>=3);
- an XLM-R `sentencepiece.bpe.model`, with fairseq's id layout (<s>=0, <pad>=1,
  </s>=2, <unk>=3, every piece shifted by one);
- a `tokenizer.json` from an imported checkpoint (the `tokenizers` package).
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from etils import epath
import numpy as np


class Tokenizer:
  """Base class: subclasses implement `_encode_plain` and set the special ids."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  path: str

  def _encode_plain(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def encode(self, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
    """Ids with special tokens, truncated to max_length; (ids, number truncated)."""
    if max_length < 3:
      raise ValueError(f"max_length={max_length} leaves no room for text between "
                       "the special tokens.")
    out, truncated = [], 0
    for ids in self._encode_plain(list(texts)):
      if len(ids) > max_length - 2:
        ids = ids[:max_length - 2]
        truncated += 1
      out.append([self.bos_id, *ids, self.eos_id])
    return out, truncated

  def pad(self, ids: list[list[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [n, L], mask bool [n, L]); L = `length` or the longest."""
    length = length or max((len(x) for x in ids), default=1)
    arr = np.full((len(ids), length), self.pad_id, np.int32)
    mask = np.zeros((len(ids), length), bool)
    for i, x in enumerate(ids):
      x = x[:length]
      arr[i, :len(x)] = x
      mask[i, :len(x)] = True
    return arr, mask


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece .model; fairseq (XLM-R) id layout when `fairseq_ids`."""

  def __init__(self, path: str, fairseq_ids: bool | None = None):
    import sentencepiece as spm
    self.path = path
    self.sp = spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())
    if fairseq_ids is None:
      # XLM-R's model has <unk>=0, <s>=1, </s>=2 and no pad piece.
      fairseq_ids = self.sp.pad_id() < 0 and self.sp.unk_id() == 0
    self.fairseq = fairseq_ids
    if fairseq_ids:
      self.offset = 1
      self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
      self.vocab_size = self.sp.get_piece_size() + 2  # + <pad> and <mask> (XLM-R: 250,002).
    else:
      self.offset = 0
      self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
      self.unk_id = self.sp.unk_id()
      if min(self.pad_id, self.bos_id, self.eos_id) < 0:
        raise ValueError(f"{path}: a SentencePiece model needs pad, bos and eos pieces "
                         "(train it with train_sentencepiece).")
      self.vocab_size = self.sp.get_piece_size()

  def _encode_plain(self, texts):
    ids = self.sp.encode(texts)
    if self.offset:
      # fairseq maps spm <unk>=0 to 3 and shifts the other pieces by one.
      ids = [[self.unk_id if i == 0 else i + self.offset for i in x] for x in ids]
    return ids


class HFTokenizer(Tokenizer):
  """A `tokenizer.json`; special tokens from its post-processor template."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as RustTokenizer
    self.path = path
    self.tok = RustTokenizer.from_str(epath.Path(path).read_text())
    self.tok.no_truncation()
    self.tok.no_padding()
    vocab = self.tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    probe = self.tok.encode("a", add_special_tokens=True)
    plain = self.tok.encode("a", add_special_tokens=False)
    if len(probe.ids) != len(plain.ids) + 2:
      raise ValueError(f"{path}: expected the post-processor to add one token on each side.")
    self.bos_id, self.eos_id = probe.ids[0], probe.ids[-1]
    pad = next((vocab[t] for t in ("<pad>", "[PAD]") if t in vocab), None)
    if pad is None:
      raise ValueError(f"{path}: no <pad> or [PAD] token in the vocabulary.")
    self.pad_id = pad

  def _encode_plain(self, texts):
    return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]


def load_tokenizer(path: str) -> Tokenizer:
  """A .model file, a tokenizer.json, or a folder holding either."""
  folder = epath.Path(path)
  if folder.is_dir():
    for name in ("tokenizer.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model"):
      if (folder / name).exists():
        return load_tokenizer(os.fspath(folder / name))
    raise FileNotFoundError(
        f"No tokenizer in {path}: expected tokenizer.json or a SentencePiece .model file.")
  if not folder.exists():
    raise FileNotFoundError(f"Tokenizer file {path} does not exist.")
  if path.endswith(".json"):
    return HFTokenizer(path)
  return SentencePieceTokenizer(path)


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str) -> Tokenizer:
  """Trains a unigram SentencePiece model (pad=0, unk=1, <s>=2, </s>=3) on `texts`."""
  import sentencepiece as spm
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size,
      model_type="unigram", character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      input_sentence_size=200_000, shuffle_input_sentence=True, num_threads=2,
      max_sentence_length=8192, minloglevel=2, hard_vocab_limit=False)
  return SentencePieceTokenizer(model_prefix + ".model", fairseq_ids=False)

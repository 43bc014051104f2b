"""Contrastive data: JSONL records -> prepared ArrayRecord datasets -> batches.

  jsonl          reading and checking {"query", "document", "negatives"?, "source"?} lines
  preparation    `prepare`: JSONL files -> a dataset folder; truncation statistics
  builder        the TFDS builder: one ArrayRecord split per source
  dataset        a dataset folder: writing it (all or nothing), its info, sources,
                 tokenizer and held-out split
  beam_prepare   the same preparation as Apache Beam pipelines, for corpora of any size
  pipeline       InputConfig and the resumable, multi-host batch iterator
  packing        several texts per row of one fixed length
  corpus_stdlib  the embedded pair corpus built from the standard library's docstrings
  corpus_cache   `ensure_default_data`: that corpus, prepared once and cached
  mining         hard negatives by exact search with a model (uses evaluation.search)

This module only re-exports what callers use. TensorFlow Datasets is imported
by `builder` alone, which `dataset` imports when it writes or opens splits, so
importing this package (or the trainer) does not load it.
Imports: `moe_embed.tokenizers`; `mining` also `moe_embed.evaluation.search`;
`beam_prepare` needs the [beam] extra.
"""

from moe_embed.data.corpus_cache import DEFAULT_VOCAB, default_cache_dir, ensure_default_data
from moe_embed.data.dataset import dataset_tokenizer_path, heldout_beir_dirs
from moe_embed.data.pipeline import InputConfig, TrainIterator, make_train_iterator
from moe_embed.data.preparation import (TOKENIZER_SAMPLE, TRUNCATION_SAMPLE, prepare,
                                        truncation_stats)

__all__ = ["InputConfig", "TrainIterator", "make_train_iterator", "prepare",
           "truncation_stats", "ensure_default_data", "default_cache_dir",
           "dataset_tokenizer_path", "heldout_beir_dirs", "DEFAULT_VOCAB",
           "TOKENIZER_SAMPLE", "TRUNCATION_SAMPLE"]

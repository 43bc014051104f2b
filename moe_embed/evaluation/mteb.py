"""MTEB from JAX: an encoder that the `mteb` package accepts, backed by our Embedder.

  from moe_embed.evaluation import mteb as mteb_eval
  encoder = mteb_eval.MtebEncoder(load_embedder("/tmp/moe_embed_tiny"), dim=256)
  scores = mteb_eval.run_tasks(encoder, ["SciFact", "STS12"])

`MtebEncoder` implements mteb's encoder protocol (`encode(inputs, task_metadata=...,
hf_split=..., hf_subset=..., prompt_type=...)`): queries get the model's query
prefix, documents its document prefix, and texts of symmetric tasks (STS,
classification, clustering: no prompt type) the query prefix, as Nomic Embed
encodes a text that is compared with texts like it. Embeddings are L2-normalised
and scored by cosine. Needs `pip install -e ".[mteb]"`; tasks fetch their data
from the Hugging Face Hub, so named tasks need a network (or a filled cache).
`beir_task` turns a local BEIR folder into an mteb retrieval task.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from etils import epath
import numpy as np

from moe_embed import storage, validation
from moe_embed.evaluation.evaluator import normalize

try:
  import mteb
  from mteb.abstasks.retrieval import AbsTaskRetrieval
  from mteb.abstasks.task_metadata import TaskMetadata
  from mteb.models.abs_encoder import AbsEncoder
  from mteb.models.model_meta import ModelMeta, ScoringFunction
  from mteb.types import PromptType
except ImportError as e:  # pragma: no cover - depends on the environment.
  raise ImportError("MTEB evaluation needs the mteb package: pip install -e '.[mteb]'.") from e


class MtebEncoder(AbsEncoder):
  """mteb's encoder protocol over a moe_embed Embedder (or any object with its `encode`)."""

  def __init__(self, embedder, *, dim: Optional[int] = None, batch_size: int = 64,
               query_prefix: Optional[str] = None, doc_prefix: Optional[str] = None,
               name: str = "moe-embed/model", show_progress: bool = False,
               cache: Optional[dict] = None):
    """Prefixes default to the embedder's own; `dim` keeps the first dims (Matryoshka).

    cache: a dict shared by encoders of several widths: each (prefix, text) is
    encoded once at full width and cut to each width (one pass for all dims).
    """
    self.model = embedder
    self.cache = cache
    self.dim = dim
    self.batch_size = batch_size
    self.show_progress = show_progress
    self.query_prefix = (embedder.query_prefix if query_prefix is None else query_prefix) or ""
    self.doc_prefix = (embedder.doc_prefix if doc_prefix is None else doc_prefix) or ""
    config = getattr(embedder, "config", None)
    full = getattr(config, "embedding_dim", None)
    if full:  # Otherwise the embedder's own encode(dim=...) checks it.
      validation.check_widths([dim], full)
    width = dim or full
    self.mteb_model_meta = ModelMeta.create_empty(overwrites={
        "name": name if "/" in name else f"moe-embed/{name}",
        "embed_dim": width,
        "max_tokens": getattr(embedder, "max_length", None),
        "similarity_fn_name": ScoringFunction.COSINE,
    })

  def prefix_for(self, prompt_type: Optional[PromptType]) -> str:
    """The document prefix for documents, the query prefix otherwise (module doc)."""
    if prompt_type is not None and PromptType(prompt_type) is PromptType.document:
      return self.doc_prefix
    return self.query_prefix

  def encode(self, inputs, *, task_metadata=None, hf_split: str = "", hf_subset: str = "",
             prompt_type: Optional[PromptType] = None, **kwargs: Any) -> np.ndarray:
    """float32 [n, d] unit-norm embeddings of every text in the DataLoader `inputs`."""
    texts = [text for batch in inputs for text in batch["text"]]
    batch_size = kwargs.get("batch_size") or self.batch_size
    prefix = self.prefix_for(prompt_type)
    if self.cache is None:
      return self.model.encode(texts, prefix=prefix, dim=self.dim, batch_size=batch_size,
                               show_progress=self.show_progress)
    todo = list(dict.fromkeys(t for t in texts if (prefix, t) not in self.cache))
    if todo:
      vectors = self.model.encode(todo, prefix=prefix, batch_size=batch_size,
                                  show_progress=self.show_progress)
      self.cache.update(((prefix, t), v) for t, v in zip(todo, vectors))
    full = np.stack([self.cache[(prefix, t)] for t in texts]) if texts else np.zeros((0, 1))
    return normalize(full, self.dim)


def _read_jsonl(path: str) -> list[dict]:
  with epath.Path(path).open("r", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def beir_task(folder: str, split: str = "test", name: Optional[str] = None) -> AbsTaskRetrieval:
  """An mteb retrieval task (AbsTaskRetrieval) over a local BEIR folder, read with plain
  json / csv reading, not our loader: mteb joins titles and scores the run itself."""
  name = name or os.path.basename(os.path.normpath(folder))
  corpus = [{"id": str(r["_id"]), "title": r.get("title") or "", "text": r["text"]}
            for r in _read_jsonl(os.path.join(folder, "corpus.jsonl"))]
  queries = [{"id": str(r["_id"]), "text": r["text"]}
             for r in _read_jsonl(os.path.join(folder, "queries.jsonl"))]
  qrels: dict[str, dict[str, int]] = {}
  with (epath.Path(folder) / "qrels" / f"{split}.tsv").open("r", encoding="utf-8") as f:
    for line in f:
      parts = line.rstrip("\r\n").split("\t")
      if len(parts) == 3 and parts[2].strip().lstrip("-").isdigit():
        qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
  metadata = TaskMetadata(
      name=name, description=f"Local BEIR folder {folder}.", reference=None,
      dataset={"path": storage.absolute(folder), "revision": "local"}, type="Retrieval",
      category="t2t", modalities=["text"], eval_splits=[split], eval_langs=["eng-Latn"],
      main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
      annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None)

  class _LocalBeir(AbsTaskRetrieval):
    def load_data(self, num_proc: Optional[int] = None, **kwargs: Any) -> None:
      from datasets import Dataset
      from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
      self.dataset = {"default": {split: RetrievalSplitData(
          queries=Dataset.from_list(queries), corpus=Dataset.from_list(corpus),
          relevant_docs=qrels, top_ranked=None)}}
      self.data_loaded = True

  _LocalBeir.metadata = metadata
  return _LocalBeir()


def get_tasks(names: Sequence[str]) -> list:
  """mteb task objects by name; an unknown name fails here, before any encoding."""
  tasks = []
  for name in names:
    try:
      tasks += list(mteb.get_tasks(tasks=[name]))
    except KeyError as e:  # mteb's message suggests a close name.
      raise ValueError(f"Unknown MTEB task {name!r}: {e.args[0] if e.args else ''}") from None
    if name not in {t.metadata.name for t in tasks}:
      raise ValueError(f"Unknown MTEB task {name!r}.")
  return tasks


def run_tasks(encoder: MtebEncoder, tasks: Sequence[Any], *, dims: Sequence[int] = (),
              show_progress: bool = True) -> dict[str, dict[str, Any]]:
  """{task name: {"main_score", "scores": {split: {subset: {metric: value}}}, "dims"?}}.

  tasks: names or task objects; nothing is cached on disk. With `dims`, each task
  is scored again at every width from the same embeddings ("dims": {"<width>":
  {"main_score", "scores"}}), the texts encoded once at full width.
  """
  objects = [t for t in tasks if not isinstance(t, str)]
  objects += get_tasks([t for t in tasks if isinstance(t, str)]) if any(
      isinstance(t, str) for t in tasks) else []
  if dims and encoder.cache is None:
    encoder.cache = {}
  # Made first, so that each checks its width before any task runs.
  subs = {width: MtebEncoder(encoder.model, dim=width, batch_size=encoder.batch_size,
                             query_prefix=encoder.query_prefix, doc_prefix=encoder.doc_prefix,
                             name=encoder.mteb_model_meta.name, cache=encoder.cache)
          for width in dims}
  out = _evaluate(encoder, objects, show_progress)
  for width, sub in subs.items():
    for name, scored in _evaluate(sub, objects, show_progress).items():
      out[name].setdefault("dims", {})[str(width)] = scored
  return out


def _evaluate(encoder: MtebEncoder, tasks: Sequence[Any], show_progress: bool):
  """{task name: {"main_score", "scores"}} of one mteb.evaluate call (finite numbers only)."""
  result = mteb.evaluate(encoder, list(tasks), cache=None,
                         encode_kwargs={"batch_size": encoder.batch_size},
                         show_progress_bar=show_progress)
  out: dict[str, dict[str, Any]] = {}
  for task_result in result.task_results:
    scores = {split: {entry["hf_subset"]: {k: float(v) for k, v in entry.items()
                                           if isinstance(v, (int, float)) and np.isfinite(v)}
                      for entry in entries}
              for split, entries in task_result.scores.items()}
    mains = [s["main_score"] for sub in scores.values() for s in sub.values()
             if "main_score" in s]
    out[task_result.task_name] = {
        "main_score": float(np.mean(mains)) if mains else None, "scores": scores}
  return out

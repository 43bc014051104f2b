"""Evaluates an embedding model on BEIR-format folders and MTEB tasks.

  python launch/eval.py --model=/tmp/moe_embed_tiny --beir=/data/beir/scifact,/data/miracl \
      --dims=768,256,64 --routing --output=/tmp/scores.json
  python launch/eval.py --model=M --mteb_tasks=SciFact,STS12 --output=/tmp/mteb.json

--model is a model folder (imported or upcycled) or a training workdir (its
latest checkpoint), encoded with the model's own token limit unless
--max_length is given. Prefixes default to the model's own; pass
--query_prefix= (empty) to encode without one. A --beir folder without
corpus.jsonl whose subfolders are BEIR folders (MIRACL: one per language) is
scored per subfolder, with a "<folder>/average" row. --dims scores every
Matryoshka width from one encoding pass, and so does --quantize=int8,binary for
storage precisions (sentence-transformers' quantize_embeddings conventions: int8
ranges calibrated on the first document chunk, packed binary ranked by Hamming
distance; --rescore_multiplier re-ranks with the float query); --routing adds
router statistics (MoE models). Prints tables and, with --output, writes
{"<folder name>": {"ndcg@10", "recall@10", "recall@100", "mrr@10", "num_queries",
"num_docs", ..., "dims"?: {"<width>": {...}}, "quantize"?: {"int8"|"binary": {...,
"bytes_per_vector"}}, "routing"?: {...}}, ...,
"average": {...}, "mteb"?: {"<task>": {"main_score", "scores", "dims"?}}} as JSON.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from moe_embed import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Model folder or training workdir.")
_BEIR = flags.DEFINE_list("beir", [], "Comma-separated BEIR folders (or folders of them).")
_MTEB_TASKS = flags.DEFINE_list("mteb_tasks", [],
                                "Comma-separated MTEB task names (needs the [mteb] extra).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results here as JSON.")
_DIM = flags.DEFINE_integer("dim", None, "Matryoshka dimension (first D dims, re-normalised).")
_DIMS = flags.DEFINE_list("dims", [], "Matryoshka dimensions all scored from one encoding.")
_ROUTING = flags.DEFINE_bool("routing", False,
                             "Report per-folder router statistics of an MoE model.")
_QUERY_PREFIX = flags.DEFINE_string("query_prefix", None,
                                    "Prepended to queries; default: the model's own.")
_DOC_PREFIX = flags.DEFINE_string("doc_prefix", None,
                                  "Prepended to documents; default: the model's own.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Texts per encoder batch.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 8192,
                                   "Documents encoded and searched at a time (bounds memory).")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None,
                                   "Tokens per text; default: the model's own token limit.")
_SPLIT = flags.DEFINE_string("split", "test", "Qrels file: qrels/<split>.tsv.")
_QUANTIZE = flags.DEFINE_list(
    "quantize", [], "Storage precisions (int8, binary) all scored from one encoding, each with "
    "its bytes per vector.")
_RESCORE = flags.DEFINE_integer(
    "rescore_multiplier", 0, "With --quantize: re-rank the top N x 101 quantized hits with the "
    "float query; 0 ranks by the quantized scores alone.")
flags.mark_flag_as_required("model")


def _dims() -> list[int]:
  try:
    return [int(d) for d in _DIMS.value]
  except ValueError:
    raise ValueError(f"--dims={','.join(_DIMS.value)} must be integers.") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _BEIR.value and not _MTEB_TASKS.value:
    raise app.UsageError("Give --beir folders, --mteb_tasks or both.")
  from moe_embed import evaluation
  from moe_embed import inference
  from moe_embed.evaluation import beir
  if _OUTPUT.value:  # Fails now, not after hours of encoding; makes no folder.
    cli.check_output_file(_OUTPUT.value, flag="output", make_parent=False)
  dims = _dims()
  from moe_embed.evaluation import quantization
  precisions = quantization.check_precisions(_QUANTIZE.value)
  if _RESCORE.value < 0 or (_RESCORE.value and not precisions):
    raise ValueError(f"--rescore_multiplier={_RESCORE.value} must be >= 0 and needs --quantize.")
  if precisions and _MTEB_TASKS.value and not _BEIR.value:
    raise ValueError("--quantize scores --beir folders; MTEB tasks are scored in float32.")
  # Folders and task names first: bad input fails in seconds, before a model is loaded.
  datasets = [beir.load_beir(folder, _SPLIT.value, name=name)
              for name, folder in beir.expand_folders(_BEIR.value)]
  mteb_tasks = []
  if _MTEB_TASKS.value:
    from moe_embed.evaluation import mteb as mteb_eval
    mteb_tasks = mteb_eval.get_tasks(_MTEB_TASKS.value)
  embedder = inference.load_embedder(_MODEL.value, max_length=_MAX_LENGTH.value)
  if _ROUTING.value and not embedder.config.moe_layers:
    raise ValueError("--routing needs a mixture-of-experts model; this one is dense.")
  logging.info("Prefixes: query %r, document %r.",
               embedder.query_prefix if _QUERY_PREFIX.value is None else _QUERY_PREFIX.value,
               embedder.doc_prefix if _DOC_PREFIX.value is None else _DOC_PREFIX.value)
  results = {}
  if datasets:
    results = evaluation.evaluate_beir(
        embedder, datasets, dim=_DIM.value, dims=dims, batch_size=_BATCH_SIZE.value,
        query_prefix=_QUERY_PREFIX.value, doc_prefix=_DOC_PREFIX.value, split=_SPLIT.value,
        show_progress=True, routing=_ROUTING.value, chunk_size=_CHUNK_SIZE.value,
        quantize=precisions, rescore_multiplier=_RESCORE.value)
  if mteb_tasks:
    encoder = mteb_eval.MtebEncoder(
        embedder, dim=_DIM.value, batch_size=_BATCH_SIZE.value,
        query_prefix=_QUERY_PREFIX.value, doc_prefix=_DOC_PREFIX.value,
        name=os.path.basename(os.path.normpath(_MODEL.value)))
    results["mteb"] = mteb_eval.run_tasks(encoder, mteb_tasks, dims=dims)
  beir_results = {k: v for k, v in results.items() if k != "mteb"}
  if beir_results:
    print(evaluation.format_table(beir_results))
  if _ROUTING.value and beir_results:
    print(evaluation.format_routing(beir_results))
  for task, scored in results.get("mteb", {}).items():
    line = f"MTEB {task}: main score {scored['main_score']}"
    for width, sub in scored.get("dims", {}).items():
      line += f", @{width} {sub['main_score']}"
    print(line)
  if _OUTPUT.value:
    with cli.atomic_path(_OUTPUT.value) as tmp, open(tmp, "w") as f:
      json.dump(results, f, indent=2)
      f.write("\n")
    logging.info("Wrote %s.", _OUTPUT.value)


if __name__ == "__main__":
  cli.run(main)

"""A model -> a Hugging Face / sentence-transformers folder that runs on plain PyTorch.

The folder holds config.json (nomic-bert names, model_type `moe_embed`, an
auto_map to the modeling file, parameter counts, MoE layers, top-k, Matryoshka
dims, prefixes), model.safetensors in the nomic-bert layout (`hf_export`), a
copy of `modeling_moe_embed.py`, tokenizer.json + tokenizer_config.json (a
SentencePiece model is converted), and the sentence-transformers modules:
Transformer, mean Pooling, Normalize, with the prefixes as the prompts
'query' and 'document'. `hf_import.load_hf_folder` reads the folder back.
torch is not needed to write it, only to load it. With fmt='onnx' the folder
also holds onnx/model.onnx (and onnx/model_qint8.onnx), see `onnx_export`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

from etils import epath
from flax import linen as nn
import jax
import numpy as np

from moe_embed import storage
from moe_embed.io import hf_export, model_folder
from moe_embed.model import param_count
from moe_embed.model.config import EncoderConfig

MODELING_FILE = "modeling_moe_embed.py"
MODEL_TYPE = "moe_embed"


def export_config_json(config: EncoderConfig, *, matryoshka_dims: Sequence[int],
                       query_prefix: str, doc_prefix: str) -> dict:
  """config.json: nomic-bert names plus auto_map, parameter counts and the embedding facts."""
  abstract = param_count.abstract_params(config)
  out = hf_export.nomic_config_json(config)
  out.update({
      "model_type": MODEL_TYPE, "architectures": ["MoeEmbedModel"],
      "auto_map": {"AutoConfig": f"{MODELING_FILE[:-3]}.MoeEmbedConfig",
                   "AutoModel": f"{MODELING_FILE[:-3]}.MoeEmbedModel"},
      "torch_dtype": "float32",
      "num_parameters": param_count.count_params(abstract),
      "num_active_parameters": param_count.count_active_params(abstract, config),
      "moe_layers": list(config.moe_layers),
      "matryoshka_dims": [int(d) for d in matryoshka_dims],
      "query_prefix": query_prefix, "document_prefix": doc_prefix})
  return out


def _special_tokens(tokenizer_json: str) -> dict[str, str]:
  """bos/cls, eos/sep, pad, unk and mask token strings of a tokenizer.json."""
  from moe_embed.tokenizers import HFTokenizer
  tok = HFTokenizer(tokenizer_json)
  vocab = tok.tok.get_vocab(with_added_tokens=True)
  by_id = {i: t for t, i in vocab.items()}
  out = {"bos_token": by_id[tok.bos_id], "cls_token": by_id[tok.bos_id],
         "eos_token": by_id[tok.eos_id], "sep_token": by_id[tok.eos_id],
         "pad_token": by_id[tok.pad_id]}
  for key, names in (("unk_token", ("<unk>", "[UNK]")), ("mask_token", ("<mask>", "[MASK]"))):
    found = next((n for n in names if n in vocab), None)
    if found:
      out[key] = found
  return out


def sentencepiece_to_tokenizer_json(model_path: str, out_path: str) -> None:
  """Converts a SentencePiece .model (ours or XLM-R's fairseq layout) to tokenizer.json."""
  import importlib
  from tokenizers import processors
  # The module itself: `import transformers.convert_slow_tokenizer as` can bind the
  # package's lazily exported function of that name instead.
  convert = importlib.import_module("transformers.convert_slow_tokenizer")
  from moe_embed.tokenizers import SentencePieceTokenizer
  sp = SentencePieceTokenizer(model_path)

  class _Vocab:  # What the converters read from a slow tokenizer.
    vocab_file = model_path
    add_prefix_space = True
    legacy = True

  converter_cls = convert.XLMRobertaConverter if sp.fairseq else convert.SpmConverter
  tok = converter_cls(_Vocab()).converted()
  if sp.fairseq:
    bos, eos = "<s>", "</s>"
  else:
    bos, eos = sp.sp.id_to_piece(sp.bos_id), sp.sp.id_to_piece(sp.eos_id)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
      special_tokens=[(bos, sp.bos_id), (eos, sp.eos_id)])
  pad = "<pad>" if sp.fairseq else sp.sp.id_to_piece(sp.pad_id)
  tok.add_special_tokens([bos, eos, pad])
  tok.save(out_path)


def write_tokenizer(tokenizer_path: str, out: str, max_length: int) -> None:
  """tokenizer.json and a tokenizer_config.json that AutoTokenizer loads offline."""
  target = os.path.join(out, "tokenizer.json")
  if tokenizer_path.endswith(".json"):
    epath.Path(tokenizer_path).copy(target, overwrite=True)
  else:  # The converter reads a local file; the model may be a gs:// object.
    local_model = os.path.join(out, ".sentencepiece.model")
    epath.Path(tokenizer_path).copy(local_model, overwrite=True)
    sentencepiece_to_tokenizer_json(local_model, target)
    os.remove(local_model)
  with open(target) as f:
    raw = json.load(f)
  raw["truncation"], raw["padding"] = None, None  # Set per call by transformers.
  with open(target, "w") as f:
    json.dump(raw, f, ensure_ascii=False)
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_length),
            "model_input_names": ["input_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False, **_special_tokens(target)}
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)


def _write_json(path: str, value: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)


def write_sentence_transformers_modules(out: str, config: EncoderConfig, *, max_length: int,
                                        query_prefix: str, doc_prefix: str) -> None:
  """modules.json (Transformer, mean Pooling, Normalize), their configs and the prompts."""
  _write_json(os.path.join(out, "modules.json"), [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling",
       "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "name": "2", "path": "2_Normalize",
       "type": "sentence_transformers.models.Normalize"}])
  _write_json(os.path.join(out, "sentence_bert_config.json"),
              {"max_seq_length": int(max_length), "do_lower_case": False})
  _write_json(os.path.join(out, "1_Pooling", "config.json"), {
      "word_embedding_dimension": config.embedding_dim, "pooling_mode_cls_token": False,
      "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
      "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
      "pooling_mode_lasttoken": False, "include_prompt": True})
  os.makedirs(os.path.join(out, "2_Normalize"), exist_ok=True)
  _write_json(os.path.join(out, "config_sentence_transformers.json"), {
      "prompts": {"query": query_prefix, "document": doc_prefix},
      "default_prompt_name": None, "similarity_fn_name": "cosine"})


FORMATS = ("hf", "onnx")  # The folder; the folder plus onnx/model.onnx.
QUANTIZE = ("int8",)  # onnx/model_qint8.onnx beside the float32 graph.


def check_format(fmt: str, quantize: Optional[str]) -> None:
  """A one-line error for an unknown format or quantization, or quantization without ONNX."""
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r} is not one of {FORMATS}.")
  if quantize is not None and quantize not in QUANTIZE:
    raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZE}.")
  if quantize and fmt != "onnx":
    raise ValueError(f"quantize={quantize!r} quantizes the ONNX graph; export with "
                     "format='onnx' (--format=onnx).")


def export(params: Any, config: EncoderConfig, meta: dict, out: str, *,
           matryoshka_dims: Optional[Sequence[int]] = None, fmt: str = "hf",
           quantize: Optional[str] = None) -> None:
  """Writes the folder for (params, config, meta) as `model_folder.load_any` returns them.

  `out` may be a local path or any path etils.epath handles (gs://...). With
  fmt='onnx' the folder also holds onnx/model.onnx (`onnx_export`), and with
  quantize='int8' onnx/model_qint8.onnx.
  """
  check_format(fmt, quantize)
  params = nn.meta.unbox(params)
  bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(params)
         if not np.isfinite(np.asarray(x)).all()]
  if bad:
    raise ValueError(f"{len(bad)} parameter tensors hold non-finite values (e.g. {bad[0]}); "
                     f"the model diverged or is damaged, so nothing was written to {out}.")
  if epath.Path(out).is_dir() and any(epath.Path(out).iterdir()):
    raise FileExistsError(f"{out} already exists and is not empty; choose another --out.")
  try:
    import transformers.convert_slow_tokenizer  # noqa: F401  (writes tokenizer.json)
  except ImportError:
    raise ValueError(f"Exporting needs the transformers package, to write tokenizer.json: "
                     f"pip install transformers (or -e '.[torch]'). Nothing was written to "
                     f"{out}.") from None
  dims = list(matryoshka_dims or [config.embedding_dim])
  query_prefix, doc_prefix = meta.get("query_prefix", ""), meta.get("doc_prefix", "")
  max_length = int(meta.get("max_length", 512))
  # Written aside and renamed (local) or copied when complete (gs://), so an
  # interrupted export never leaves a folder that looks whole.
  if storage.is_remote(out):
    local = tempfile.mkdtemp(prefix="moe_embed_export_")
  else:
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise NotADirectoryError(f"--out={out}: {parent} is a file, not a folder; choose "
                               "another --out.")
    os.makedirs(parent, exist_ok=True)
    local = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", dir=parent)
  try:
    _write_folder(local, params, config, dims, query_prefix, doc_prefix, max_length, meta)
    if fmt == "onnx":
      from moe_embed.io import onnx_export
      onnx_export.write_onnx(local, params, config, quantize=quantize)
    if storage.is_remote(out):
      _copy_tree(local, out)
    else:
      storage.public_mode(local)  # mkdtemp and safetensors make them private.
      if os.path.isdir(out):
        os.rmdir(out)  # Empty (checked above).
      os.replace(local, out)
  finally:
    shutil.rmtree(local, ignore_errors=True)


def _write_folder(local, params, config, dims, query_prefix, doc_prefix, max_length, meta):
  from safetensors.numpy import save_file
  state = hf_export.to_nomic_state_dict(params, config)
  save_file(state, os.path.join(local, "model.safetensors"), metadata={"format": "pt"})
  _write_json(os.path.join(local, "config.json"), export_config_json(
      config, matryoshka_dims=dims, query_prefix=query_prefix, doc_prefix=doc_prefix))
  shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_FILE),
              os.path.join(local, MODELING_FILE))
  tokenizer = model_folder.tokenizer_file(meta["tokenizer"])
  write_tokenizer(tokenizer, local, max_length)
  write_sentence_transformers_modules(local, config, max_length=max_length,
                                      query_prefix=query_prefix, doc_prefix=doc_prefix)


def _copy_tree(src: str, dst: str) -> None:
  for root, _, files in os.walk(src):
    for name in files:
      path = os.path.join(root, name)
      target = epath.Path(dst) / os.path.relpath(path, src)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(open(path, "rb").read())


def matryoshka_dims_of(model_path: str) -> Optional[list[int]]:
  """loss.matryoshka_dims of a training workdir's config.json, if any."""
  path = epath.Path(model_path) / "config.json"
  if not path.exists() or not model_folder.has_meta(model_path):
    return None
  dims = (json.loads(path.read_text()).get("loss") or {}).get("matryoshka_dims")
  return [int(d) for d in dims] if dims else None


def export_model(model_path: str, out: str,
                 matryoshka_dims: Optional[Sequence[int]] = None, *, fmt: str = "hf",
                 quantize: Optional[str] = None) -> dict:
  """Exports a workdir, native or Hugging Face folder; returns the written config.json."""
  check_format(fmt, quantize)
  params, config, meta = model_folder.load_any(model_path)
  dims = matryoshka_dims or matryoshka_dims_of(model_path)
  export(params, config, meta, out, matryoshka_dims=dims, fmt=fmt, quantize=quantize)
  return export_config_json(config, matryoshka_dims=dims or [config.embedding_dim],
                            query_prefix=meta.get("query_prefix", ""),
                            doc_prefix=meta.get("doc_prefix", ""))

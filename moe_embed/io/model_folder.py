"""The model folder: one format, read and written here, for every command that takes --model.

A model folder holds `model.json`:

  {"encoder": EncoderConfig fields, "tokenizer": file name in the folder,
   "query_prefix": str, "doc_prefix": str, "max_length": int,
   "train_max_length": int (training workdirs only)}

`max_length` is the model's own token limit, what encoding uses by default;
a training workdir also records `train_max_length`, the truncation it was
trained with, which does not apply at encoding time (`encode_length`).

beside its weights: `params.safetensors` (a native folder: float32, '/'-joined
parameter paths) or `checkpoints/` (a training workdir: the newest Orbax
checkpoint). The tokenizer file is copied into the folder, so a folder can be
moved or copied whole. `load_any` also takes a Hugging Face folder (imported
on the fly). Folders written before this format still load: a native folder's
`moe_embed.json`, and a workdir's `model.json` whose tokenizer is an absolute path.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from etils import epath
import numpy as np
from flax import traverse_util

from moe_embed import storage
from moe_embed.io import checkpoints, hf_import
from moe_embed.model.config import EncoderConfig

META = "model.json"
LEGACY_META = "moe_embed.json"  # Native folders before model.json.
WEIGHTS = "params.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model", "tokenizer.model",
                   "spiece.model")


def tokenizer_file(path: str) -> str:
  """A tokenizer file, given the file or a folder that holds one."""
  folder = epath.Path(path)
  if folder.is_dir():
    for name in TOKENIZER_FILES:
      if (folder / name).exists():
        return os.fspath(folder / name)
    raise FileNotFoundError(f"No tokenizer file in {path}: expected one of {TOKENIZER_FILES}.")
  if not folder.exists():
    raise FileNotFoundError(f"Tokenizer {path} does not exist.")
  return path


def token_limit(config: EncoderConfig, meta: Optional[dict] = None) -> int:
  """The model's own token limit: as encode_length reads it from a folder's meta,
  else (fresh weights) the position table's: max_position_embeddings - position_offset
  (a rotary model records its trained context in max_position_embeddings)."""
  if meta and (meta.get("max_length") or "step" in meta):
    return encode_length(config, meta)[0]
  return int(config.max_position_embeddings - config.position_offset)


def encode_length(config: EncoderConfig, meta: dict) -> tuple[int, str]:
  """(tokens per text for encoding, where that number comes from) of a loaded model.

  A folder written by training holds both its training truncation and the
  model's limit; encoding uses the limit. A workdir written before both were
  recorded holds only the truncation: the position table's limit is used then.
  """
  if "train_max_length" in meta:
    return int(meta["max_length"]), (
        f"the model's token limit; it was trained truncated to {meta['train_max_length']}")
  if "step" in meta:  # An older training workdir: max_length was the training truncation.
    limit = int(config.max_position_embeddings - config.position_offset)
    return limit, (f"the position table's limit; the workdir records only its training "
                   f"truncation {meta.get('max_length')}")
  if meta.get("max_length"):
    return int(meta["max_length"]), "the model's token limit"
  return int(config.max_position_embeddings - config.position_offset), (
      "the position table's limit")


def write_meta(folder: str, config: EncoderConfig, *, tokenizer: str, query_prefix: str = "",
               doc_prefix: str = "", max_length: int = 512,
               train_max_length: Optional[int] = None) -> None:
  """Writes `model.json` and copies the tokenizer file into `folder`.

  max_length: the model's token limit (the default for encoding);
  train_max_length: the truncation used in training, recorded for reference.
  """
  epath.Path(folder).mkdir(parents=True, exist_ok=True)
  source = tokenizer_file(tokenizer)
  name = os.path.basename(source)
  target = os.path.join(folder, name)
  if storage.absolute(target) != storage.absolute(source):
    epath.Path(source).copy(target, overwrite=True)
  meta = {"encoder": config.to_dict(), "tokenizer": name, "query_prefix": query_prefix,
          "doc_prefix": doc_prefix, "max_length": int(max_length)}
  if train_max_length is not None:
    meta["train_max_length"] = int(train_max_length)
  (epath.Path(folder) / META).write_text(json.dumps(meta, indent=2))


def has_meta(folder: str) -> bool:
  return any((epath.Path(folder) / n).exists() for n in (META, LEGACY_META))


def read_meta(folder: str) -> tuple[EncoderConfig, dict]:
  """(EncoderConfig, meta) of a folder; meta['tokenizer'] is an absolute path."""
  for name in (META, LEGACY_META):
    path = epath.Path(folder) / name
    if path.exists():
      break
  else:
    raise FileNotFoundError(f"{folder} has no {META}: not a model folder or training workdir.")
  meta = json.loads(path.read_text())
  config = EncoderConfig.from_dict(meta.pop("encoder"))
  # A relative name is the folder's own copy; older workdirs hold an absolute path.
  tokenizer = meta["tokenizer"]
  if not (os.path.isabs(tokenizer) or storage.is_remote(tokenizer)):
    tokenizer = os.path.join(storage.absolute(folder), tokenizer)
  meta["tokenizer"] = tokenizer
  return config, meta


def save_model_folder(path: str, params: Any, config: EncoderConfig, *, tokenizer_path: str,
                      query_prefix: str = "", doc_prefix: str = "", max_length: int = 512) -> None:
  """Writes a native model folder: weights, tokenizer copy and model.json."""
  from safetensors.numpy import save
  epath.Path(path).mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(params, sep="/")
  (epath.Path(path) / WEIGHTS).write_bytes(save(
      {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}))
  write_meta(path, config, tokenizer=tokenizer_path, query_prefix=query_prefix,
             doc_prefix=doc_prefix, max_length=max_length)


def load_model_folder(path: str) -> tuple[dict, EncoderConfig, dict]:
  """(params, EncoderConfig, meta) of a native folder."""
  from safetensors.numpy import load
  config, meta = read_meta(path)
  weights = epath.Path(path) / WEIGHTS
  if not weights.exists():
    raise FileNotFoundError(f"{weights} is missing.")
  return traverse_util.unflatten_dict(load(weights.read_bytes()), sep="/"), config, meta


def is_workdir(path: str) -> bool:
  return epath.Path(checkpoints.checkpoint_dir(path)).is_dir() and has_meta(path)


def load_workdir(path: str) -> tuple[Any, EncoderConfig, dict]:
  """(params, EncoderConfig, meta) from a training workdir's newest checkpoint; meta['step']."""
  config, meta = read_meta(path)
  params, step = checkpoints.latest_params(path)
  meta["step"] = step
  return params, config, meta


def load_any(path: str) -> tuple[dict, EncoderConfig, dict]:
  """A training workdir, a native folder or a Hugging Face folder."""
  storage.check_bucket(path)  # An unreachable bucket in seconds, not minutes of retries.
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"Model path {path} does not exist.")
  if is_workdir(path):
    return load_workdir(path)
  if has_meta(path):
    return load_model_folder(path)
  if (epath.Path(path) / "config.json").exists():
    return hf_import.load_hf_folder(path)
  raise FileNotFoundError(
      f"{path} is not a model: expected {META} with {WEIGHTS} (a native folder) or with "
      "checkpoints/ (a training workdir), or config.json with weights (a Hugging Face folder).")

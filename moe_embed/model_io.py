"""Model folders: our native format, and loading any folder `--model` accepts.

A native folder holds `moe_embed.json` ({"encoder": EncoderConfig fields,
"query_prefix", "doc_prefix", "max_length", "tokenizer": relative path}),
`params.safetensors` (float32, '/'-joined parameter paths) and the tokenizer
files. `load_any` also takes a Hugging Face folder (imported on the fly) or a
training workdir (its latest checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
from flax import traverse_util

from moe_embed.model_config import EncoderConfig

META = "moe_embed.json"
WEIGHTS = "params.safetensors"


def save_model_folder(path: str, params: Any, config: EncoderConfig, *, tokenizer_path: str,
                      query_prefix: str = "", doc_prefix: str = "", max_length: int = 512) -> None:
  """Writes a native model folder (tokenizer files copied next to the weights)."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  flat = traverse_util.flatten_dict(params, sep="/")
  save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()},
            os.path.join(path, WEIGHTS))
  if os.path.isdir(tokenizer_path):
    names = [n for n in ("tokenizer.json", "sentencepiece.bpe.model", "tokenizer.model",
                         "spiece.model") if os.path.exists(os.path.join(tokenizer_path, n))]
    if not names:
      raise FileNotFoundError(f"No tokenizer file in {tokenizer_path}.")
    tokenizer_path = os.path.join(tokenizer_path, names[0])
  name = os.path.basename(tokenizer_path)
  if os.path.abspath(os.path.join(path, name)) != os.path.abspath(tokenizer_path):
    shutil.copy(tokenizer_path, os.path.join(path, name))
  with open(os.path.join(path, META), "w") as f:
    json.dump({"encoder": config.to_dict(), "query_prefix": query_prefix,
               "doc_prefix": doc_prefix, "max_length": int(max_length), "tokenizer": name},
              f, indent=2)


def load_model_folder(path: str) -> tuple[dict, EncoderConfig, dict]:
  """(params, EncoderConfig, meta) of a native folder; meta['tokenizer'] is absolute."""
  from safetensors.numpy import load_file
  with open(os.path.join(path, META)) as f:
    meta = json.load(f)
  config = EncoderConfig.from_dict(meta.pop("encoder"))
  weights = os.path.join(path, WEIGHTS)
  if not os.path.exists(weights):
    raise FileNotFoundError(f"{weights} is missing.")
  params = traverse_util.unflatten_dict(load_file(weights), sep="/")
  meta["tokenizer"] = os.path.join(path, meta["tokenizer"])
  return params, config, meta


def load_any(path: str) -> tuple[dict, EncoderConfig, dict]:
  """A native folder, a Hugging Face folder or a training workdir."""
  from moe_embed import checkpoints, hf_import
  if not os.path.exists(path):
    raise FileNotFoundError(f"Model path {path} does not exist.")
  if os.path.exists(os.path.join(path, META)):
    return load_model_folder(path)
  if checkpoints.is_workdir(path):
    return checkpoints.latest_params(path)
  if os.path.exists(os.path.join(path, "config.json")):
    return hf_import.load_hf_folder(path)
  raise FileNotFoundError(
      f"{path} is not a model: expected {META} (a native folder), config.json with weights "
      "(a Hugging Face folder) or checkpoints/ and model.json (a training workdir).")

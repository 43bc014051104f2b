"""Fields shared by the pretraining and finetuning configs, each with its meaning.

Config files call `base_config(arg)`: `arg` is the one string after the colon in
`--config=configs/finetune.py:ARG`, e.g. `tiny` or `model=nomic_v2_moe,steps=2000`.
"""

from __future__ import annotations

import ml_collections

from moe_embed.model import config as model_config

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _parse_value(key: str, text: str, default):
  """`text` as the type of `default`; booleans strictly, numbers with a clear error."""
  if default is None or isinstance(default, str):
    return text
  if isinstance(default, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"Config argument {key}={text!r} is not a boolean; use true or false.")
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"Config argument {key}={text!r} is not a {type(default).__name__}.") from None


def parse_arg(arg: str | None, **defaults):
  """Parses 'a,b=c' into a ConfigDict over `defaults`; a bare word sets `model`."""
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if not value:
      key, value = "model", key
    if key not in out:
      raise KeyError(f"Unknown config argument {key!r}; known: {sorted(out.keys())}.")
    out[key] = _parse_value(key, value, defaults[key])
  return out


def encoder_fields(model: str) -> ml_collections.ConfigDict:
  """Architecture fields of a preset; only the runtime ones for a model folder."""
  if model in model_config.PRESETS:
    fields = model_config.preset(model).to_dict()
  else:
    defaults = model_config.EncoderConfig().to_dict()
    fields = {k: defaults[k] for k in model_config.RUNTIME_FIELDS}
  return ml_collections.ConfigDict(fields)


def base_config(model: str) -> ml_collections.ConfigDict:
  """Defaults for every field; the stage configs change what differs."""
  c = ml_collections.ConfigDict()
  # What to train: a preset name ('tiny', 'minilm', 'nomic_v2_moe') for fresh
  # weights, or a model folder (imported, upcycled) to start from.
  c.model = model
  # Architecture (see moe_embed/model/config.py). For a model folder, only the
  # runtime fields (dtype, remat, moe_dispatch, capacity_factor, grouped_matmul,
  # expert_exchange) apply.
  c.encoder = encoder_fields(model)
  c.encoder.dtype = "bfloat16"  # Compute dtype; params, router and loss stay float32.
  # Tokenizer: '' = the model folder's, else the dataset's SentencePiece model.
  c.tokenizer = ""
  # Dataset folder made by launch/prepare_data.py; '' = the embedded stdlib corpus
  # (built and cached on first use).
  c.data = ""

  c.input = ml_collections.ConfigDict()
  # Query / document tokens, including special tokens: the width of every batch.
  c.input.max_query_len = 128
  c.input.max_doc_len = 128
  c.input.num_negatives = 0  # Hard negatives per query (from the dataset).
  # Prepended to every query / document of a source that sets no prefix of its own.
  c.input.query_prefix = "search_query: "
  c.input.doc_prefix = "search_document: "
  # Per-source prompts and lengths: source name -> any of query_prefix, doc_prefix,
  # max_query_len, max_doc_len, e.g. {"reviews": {"query_prefix": "classification: ",
  # "doc_prefix": "classification: "}}. Wins over the dataset's own per-source values
  # (prepare_data.py --source_prefixes), which win over the global fields above.
  # Lengths truncate that source's texts and may not exceed the global ones (batches
  # are padded to the global width, so shapes never change). None = none. Set it in a
  # config file: like source_weights, a dict cannot be given on the command line.
  c.input.source_prefixes = ml_collections.config_dict.placeholder(dict)
  # Source name -> sampling weight; None = proportional to source size.
  c.input.source_weights = ml_collections.config_dict.placeholder(dict)
  # False: data without any hard negatives trains with in-batch negatives only
  # (with a logged note) instead of failing.
  c.input.negatives_required = True
  # Pack each step's texts into rows of pack_length tokens (segment ids, positions
  # per text; attention, pooling and routing per text) instead of padding every text
  # to its width. Rows per step are sized from the data at start-up.
  c.input.packing = False
  c.input.pack_length = 0  # Tokens per packed row; 0 = max(max_query_len, max_doc_len).

  c.seed = 0  # Parameter init, data order.
  c.batch_size = 256  # Global batch (queries per step), split over the mesh.
  c.total_steps = 1000
  c.log_every_steps = 10  # Metrics to metrics.jsonl and TensorBoard.
  # Peak FLOP/s of one device, for mfu (model FLOPs of the real tokens / peak) in
  # metrics.jsonl; 0 = a TPU's bfloat16 peak from its generation, no mfu elsewhere.
  c.peak_flops_per_device = 0.0
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3  # Most recent checkpoints kept.
  # GradCache chunk (queries per chunk); 0 = plain step. Must divide batch_size.
  c.grad_cache_chunk = 0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-5  # Peak learning rate.
  c.optimizer.warmup_steps = 400  # Linear warmup from 0.
  c.optimizer.decay = "linear"  # 'linear', 'cosine' or 'constant' after warmup.
  c.optimizer.end_lr_fraction = 0.0  # Final lr as a fraction of the peak.
  c.optimizer.weight_decay = 0.01  # AdamW decay (matrices and tables only).
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.clip_grad_norm = 1.0  # Global-norm clipping; 0 disables.

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.02  # InfoNCE temperature (initial value if learned).
  c.loss.learn_temperature = False  # Learn log(temperature).
  c.loss.symmetric = False  # Add the document -> query term.
  c.loss.matryoshka_dims = ()  # e.g. (768, 256); () = full embedding only.
  c.loss.matryoshka_weights = ()  # One per dim; () = equal weights.
  c.loss.load_balancing_coef = 1.0  # Switch load-balancing loss weight.
  c.loss.z_loss_coef = 0.0  # Router z-loss weight (1e-3 is common).

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel size; -1 = all devices not used by 'expert'.
  c.mesh.expert = 1  # Expert-parallel size.
  # Logical axis -> mesh axes rules; None = moe_embed.partitioning.DEFAULT_RULES.
  c.mesh.rules = ml_collections.config_dict.placeholder(tuple)

  c.eval = ml_collections.ConfigDict()
  c.eval.enabled = True  # Score retrieval at the end (and every_steps).
  # BEIR folders (comma-separated); '' = the dataset's held-out split if it has one.
  c.eval.beir = ""
  c.eval.every_steps = 0  # Evaluate during training every N steps; 0 = only at the end.
  c.eval.batch_size = 128  # Texts per encoding batch.
  c.eval.dim = 0  # Matryoshka dim to evaluate; 0 = full.
  c.eval.max_length = 256  # Tokens per text when encoding for evaluation.
  c.eval.at_start = True  # Also score the untrained model, to compare.
  return c


def apply_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks a config to train on a laptop CPU in a few minutes."""
  c.encoder.dtype = "float32"  # bf16 matmuls are slow on most CPUs.
  c.input.max_query_len = 32
  c.input.max_doc_len = 96
  c.batch_size = 64
  c.total_steps = 300
  c.log_every_steps = 10
  c.checkpoint_every_steps = 100
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.weight_decay = 0.01
  c.loss.temperature = 0.05
  c.eval.batch_size = 256
  c.eval.max_length = 128
  # Hard negatives where the data has them; the embedded corpus has none.
  c.input.negatives_required = False

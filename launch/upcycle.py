"""Turns a dense model folder into a Mixture-of-Experts model folder (sparse upcycling).

  python launch/upcycle.py --model=DENSE_DIR --num_experts=8 --top_k=2 \
      --moe_every_n_layers=2 --out=MOE_DIR

MOE_DIR is a native model folder that every command taking --model accepts.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Dense model: Hugging Face or native folder, or workdir.")
_OUT = flags.DEFINE_string("out", None, "Folder to write the MoE model to.")
_NUM_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Experts per MoE layer.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_EVERY = flags.DEFINE_integer("moe_every_n_layers", 2, "Layer i is MoE when i % n == n - 1.")
_RENORM = flags.DEFINE_bool("renormalize_topk", False, "Renormalise the top-k weights to sum 1.")
_KEEP_BIASES = flags.DEFINE_bool(
    "keep_biases", False, "Keep the dense MLP biases (per-expert fc1 bias, shared fc2 bias).")
_NOISE = flags.DEFINE_float("noise_std", 0.0, "Gaussian noise added to each expert copy.")
_SEED = flags.DEFINE_integer("seed", 0, "Router initialisation and noise seed.")
flags.mark_flags_as_required(["model", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moe_embed.io import model_folder
  from moe_embed.model import upcycle
  cli.check_output_folder(_OUT.value)
  params, config, meta = model_folder.load_any(_MODEL.value)
  moe_params, moe_config = upcycle.upcycle(
      params, config, num_experts=_NUM_EXPERTS.value, top_k=_TOP_K.value,
      moe_every_n_layers=_EVERY.value, renormalize_topk=_RENORM.value,
      keep_biases=_KEEP_BIASES.value, noise_std=_NOISE.value, seed=_SEED.value)
  model_folder.save_model_folder(
      _OUT.value, moe_params, moe_config, tokenizer_path=meta["tokenizer"],
      query_prefix=meta.get("query_prefix", ""), doc_prefix=meta.get("doc_prefix", ""),
      max_length=meta.get("max_length", 512))
  print(f"Wrote an MoE model ({moe_config.num_experts} experts, top-{moe_config.top_k}, "
        f"MoE layers {list(moe_config.moe_layers)}) to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)

"""The README's table of the paper recipes compiled for TPU slices (launch/compile.py's
report for each recipe and topology), one compile after another.

  python benchmarks/tpu_recipes.py --json=/tmp/tpu_recipes.json
  python benchmarks/tpu_recipes.py --recipes=finetune --topologies=v5p-8,v6e-8
  python benchmarks/tpu_recipes.py --from_json=/tmp/a.json,/tmp/b.json   # table only

Each nomic_v2_moe compile takes 5-30 minutes on a 2-core CPU. Step times and MFU are
XLA's cost-model estimates for the compiled program, not measurements.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import report  # noqa: E402

_RECIPES = flags.DEFINE_list("recipes", ["finetune", "pretrain"], "configs/<name>.py recipes.")
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5p-8", "v5p-64", "v4-32", "v6e-8"],
                                "Accelerator types or topology strings.")
_MODEL = flags.DEFINE_string("model", "nomic_v2_moe", "The config argument (a preset).")
_JSON = flags.DEFINE_string("json", None, "Write the reports here.")
_FROM_JSON = flags.DEFINE_list("from_json", [], "Print the table of these reports; compile none.")

GiB = 1024 ** 3


def row(recipe: str, r: dict) -> str:
  mem = r["memory_bytes_per_chip"]
  step = r.get("estimated_step_s")
  source = " (roofline)" if r.get("step_estimate") == "roofline" else ""
  est = (f"{step:.2f} s{source} | {r['estimated_tokens_per_s_per_chip']:,.0f} | "
         f"{r['estimated_mfu']:.1%}") if step else "- | - | -"
  change = (f"`grad_cache_chunk={r['grad_cache_chunk']}`"
            + (", `encoder.remat=true`" if r["remat"] else ""))
  return (f"| {r['topology']} ({r['chips']} chips) | {recipe} | {change} | "
          f"{'yes' if r['fits'] else '**no**'} | {mem['total'] / GiB:.1f} of "
          f"{r['hbm_bytes_per_chip'] / GiB:.0f} GiB | {est} | {r['compile_s'] / 60:.0f} min |")


HEADER = ("| slice | recipe | setting | fits | memory per chip | est. step | "
          "est. tokens/s/chip | est. MFU | compile |\n| --- | --- | --- | --- | --- | --- | "
          "--- | --- | --- |")


def main(argv):
  del argv
  rows = []
  if _FROM_JSON.value:
    for path in _FROM_JSON.value:
      with open(path) as f:
        value = json.load(f)
      for r in value if isinstance(value, list) else [value]:
        rows.append((r.get("recipe", os.path.basename(path).split("_")[0]), r))
  else:
    import importlib
    from moe_embed.train import aot
    for name in _RECIPES.value:
      recipe = importlib.import_module(f"configs.{name}")
      for topology in _TOPOLOGIES.value:
        result, _ = aot.compile_step(recipe.get_config(_MODEL.value),
                                     aot.parse_topology(topology))
        result["recipe"] = name
        rows.append((name, result))
        print(row(name, result), flush=True)
  print(HEADER)
  for name, r in rows:
    print(row(name, r))
  report.write_json(_JSON.value, [r for _, r in rows])


if __name__ == "__main__":
  app.run(main)

"""Exports a model to a Hugging Face / sentence-transformers folder that runs on plain PyTorch.

  python launch/export.py --model=PATH --out=DIR [--format=hf|onnx] [--quantize=int8]

PATH: a training workdir, a native or a Hugging Face folder. DIR (local or
gs://) loads offline with `SentenceTransformer(DIR, trust_remote_code=True)` and
`transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)`.
--format=onnx adds onnx/model.onnx (sparse top-k MoE layers, dynamic batch and
sequence axes; needs the [onnx] extra) and --quantize=int8 onnx/model_qint8.onnx.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Workdir, native or Hugging Face model folder.")
_OUT = flags.DEFINE_string("out", None, "Folder to write (local or gs://).")
_DIMS = flags.DEFINE_list(
    "matryoshka_dims", None,
    "Matryoshka dims to record in config.json; default: the workdir's loss.matryoshka_dims, "
    "else the full width.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "onnx"],
                            "hf: the PyTorch folder; onnx: the folder plus onnx/model.onnx.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8"],
                              "With --format=onnx: also onnx/model_qint8.onnx (int8 weights).")
flags.mark_flags_as_required(["model", "out"])


def _check_onnx_installed() -> None:
  for module in ("onnx",) + (("onnxruntime",) if _QUANTIZE.value else ()):
    try:
      __import__(module)
    except ImportError:
      raise cli.UserError(f"--format=onnx needs {module}: pip install -e '.[onnx]'.") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from moe_embed.io import st_export
  st_export.check_format(_FORMAT.value, _QUANTIZE.value)
  if _FORMAT.value == "onnx":
    _check_onnx_installed()
  dims = [int(d) for d in _DIMS.value] if _DIMS.value else None
  written = st_export.export_model(_MODEL.value, _OUT.value, matryoshka_dims=dims,
                                   fmt=_FORMAT.value, quantize=_QUANTIZE.value)
  print(f"Wrote {_OUT.value}: {written['num_parameters']:,} parameters "
        f"({written['num_active_parameters']:,} active per token), MoE layers "
        f"{written['moe_layers']}, Matryoshka dims {written['matryoshka_dims']}"
        + (", onnx/model.onnx" if _FORMAT.value == "onnx" else "")
        + (", onnx/model_qint8.onnx" if _QUANTIZE.value else "") + ".")


if __name__ == "__main__":
  cli.run(main)

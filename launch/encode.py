"""Embeds texts, one per line, into a float32 [n, d] .npy array (L2-normalised, input order).

  python launch/encode.py --model=PATH --input=TEXTS.txt --output=EMB.npy \
      [--prefix=query|document|none] [--dim=D] [--batch_size=B] [--quantize=int8|binary]

--quantize stores them as sentence-transformers' quantize_embeddings does:
int8 [n, d] with per-dimension ranges calibrated on these texts (written to
EMB.ranges.npy, float32 [2, d]) or taken from --ranges (a corpus's, to quantize
its queries alike); binary as packed sign bits, int8 [n, ceil(d / 8)].

PATH: a Hugging Face or native model folder, or a training workdir (latest checkpoint).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from moe_embed import cli  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Model folder or training workdir.")
_INPUT = flags.DEFINE_string("input", None, "Text file, one text per line.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the .npy array.")
_PREFIX = flags.DEFINE_enum("prefix", "none", ["query", "document", "none"],
                            "Which of the model's prefixes to prepend.")
_DIM = flags.DEFINE_integer("dim", None, "Matryoshka dimension (first d, re-normalised).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Token limit; default: the model's.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "binary"],
                              "Store int8 or packed binary embeddings instead of float32.")
_RANGES = flags.DEFINE_string("ranges", None,
                              "With --quantize=int8: a [2, d] .npy of ranges to use (default: "
                              "calibrated on these texts and written beside --output).")
flags.mark_flags_as_required(["model", "input", "output"])


def _ranges_path(output: str) -> str:
  return (output[:-4] if output.endswith(".npy") else output) + ".ranges.npy"


def _read_lines(path: str) -> list[str]:
  """The file's lines; a line that is not UTF-8 is an error naming it."""
  from etils import epath
  if not epath.Path(path).is_file():
    raise cli.UserError(f"input file {path} does not exist.")
  texts = []
  with epath.Path(path).open("rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        texts.append(raw.decode("utf-8").rstrip("\r\n"))
      except UnicodeDecodeError as e:
        raise cli.UserError(f"{path}:{lineno} is not valid UTF-8 (byte {e.start}); convert "
                            "the file to UTF-8 (e.g. iconv -f latin1 -t utf-8).") from None
  return texts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  texts = _read_lines(_INPUT.value)
  if not texts:
    raise cli.UserError(f"{_INPUT.value} is empty.")
  cli.check_output_file(_OUTPUT.value)  # Before the encoding work, not after.
  if _RANGES.value and _QUANTIZE.value != "int8":
    raise cli.UserError("--ranges is for --quantize=int8.")
  if _RANGES.value and not os.path.isfile(_RANGES.value):
    raise cli.UserError(f"--ranges={_RANGES.value} does not exist.")
  if _QUANTIZE.value == "int8" and not _RANGES.value:
    if len(texts) < 2:
      raise cli.UserError("--quantize=int8 calibrates its ranges on the texts and needs at "
                          "least two; pass --ranges from a larger set.")
    cli.check_output_file(_ranges_path(_OUTPUT.value))
  empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
  if empty:
    print(f"Warning: {len(empty)} empty lines (first: line {empty[0]}); they are embedded "
          "as empty texts so that rows stay aligned with lines.", file=sys.stderr)
  import numpy as np
  from moe_embed import inference
  embedder = inference.load_embedder(_MODEL.value, max_length=_MAX_LENGTH.value)
  vectors = embedder.encode(texts, prefix=_PREFIX.value, dim=_DIM.value,
                            batch_size=_BATCH.value)
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    raise cli.UserError(
        f"{int(bad.sum())} of {len(texts)} embeddings hold NaN or Inf (first: line "
        f"{int(np.argmax(bad)) + 1}); the model's parameters are damaged or diverged. "
        f"Nothing was written to {_OUTPUT.value}.")
  kind = "float32"
  if _QUANTIZE.value:
    from moe_embed.evaluation import quantization
    ranges = None
    if _QUANTIZE.value == "int8":
      ranges = (np.load(_RANGES.value) if _RANGES.value else quantization.int8_ranges(vectors))
      if not _RANGES.value:
        with cli.atomic_path(_ranges_path(_OUTPUT.value)) as tmp, open(tmp, "wb") as f:
          np.save(f, ranges)
    per_vector = quantization.bytes_per_vector(_QUANTIZE.value, vectors.shape[1])
    vectors = quantization.quantize(vectors, _QUANTIZE.value, ranges)
    kind = f"{_QUANTIZE.value} ({per_vector} bytes per vector)"
  with cli.atomic_path(_OUTPUT.value) as tmp, open(tmp, "wb") as f:
    np.save(f, vectors)
  print(f"Wrote {vectors.shape[0]} x {vectors.shape[1]} {kind} embeddings to {_OUTPUT.value}"
        + (f"; {embedder.last_truncated} texts were truncated to {embedder.max_length} tokens"
           if embedder.last_truncated else ""))


if __name__ == "__main__":
  cli.run(main)

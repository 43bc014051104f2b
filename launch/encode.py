"""Embeds texts, one per line, into a float32 [n, d] .npy array (L2-normalised, input order).

  python launch/encode.py --model=PATH --input=TEXTS.txt --output=EMB.npy \
      [--prefix=query|document|none] [--dim=D] [--batch_size=B]

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
flags.mark_flags_as_required(["model", "input", "output"])


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
  with cli.atomic_path(_OUTPUT.value) as tmp, open(tmp, "wb") as f:
    np.save(f, vectors)
  print(f"Wrote {vectors.shape[0]} x {vectors.shape[1]} float32 embeddings to {_OUTPUT.value}"
        + (f"; {embedder.last_truncated} texts were truncated to {embedder.max_length} tokens"
           if embedder.last_truncated else ""))


if __name__ == "__main__":
  cli.run(main)

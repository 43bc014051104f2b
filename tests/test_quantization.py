"""Embedding quantization for storage: int8 and binary retrieval scored from one encoding pass.

The evaluator's quantized runs (documents encoded and searched in chunks, int8
ranges from the first chunk) are checked against an independent whole-corpus
NumPy implementation on a small BEIR folder, with and without float rescoring:
`quantize_embeddings`' formulas written out here (and ours checked against
sentence-transformers' own); Hamming distances by popcount of XOR.
"""

import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from moe_embed import evaluation
from moe_embed.evaluation import beir, metrics, quantization
from tests.beir_folders import write_beir
from tests.runs import FIXTURE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 44  # Not a multiple of 8: the packed binary's last byte is partial.


def _vector(text: str) -> np.ndarray:
  """A fixed random embedding per text; documents share directions with their query."""
  topic = int(text.split()[1]) % 12
  rng = np.random.default_rng(zlib.crc32(text.encode()))
  base = np.random.default_rng(topic).normal(size=DIM)
  return base + 0.9 * rng.normal(size=DIM)


def _encode(texts, prefix):
  return np.stack([_vector(t) for t in texts]).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  corpus = [{"_id": f"d{i}", "text": f"doc {i} body"} for i in range(150)]
  queries = [{"_id": f"q{j}", "text": f"query {j}"} for j in range(12)]
  qrels = [f"q{j}\td{i}\t{1 + (i % 2)}" for j in range(12) for i in range(150)
           if i % 12 == j and i < 80]
  return beir.load_beir(write_beir(tmp_path_factory.mktemp("beir"), corpus, queries, qrels))


def _np_quantize(x, precision, ranges):
  """quantize_embeddings' formulas, written out (the next test checks ours against it)."""
  if precision == "int8":
    steps = (ranges[1] - ranges[0]) / 255
    return (np.clip(np.floor((x - ranges[0]) / steps), 0, 255) - 128).astype(np.int8)
  return (np.packbits(x > 0, axis=-1) - 128).astype(np.int8)


def _reference_run(data, precision, chunk, multiplier):
  """Whole-corpus NumPy run {query: {doc: score}} (101 hits, own id dropped, top 100)."""
  norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  docs, queries = norm(_encode(data.doc_texts, "")), norm(_encode(data.query_texts, ""))
  ranges = np.stack([docs[:chunk].min(0), docs[:chunk].max(0)])
  qd, qq = _np_quantize(docs, precision, ranges), _np_quantize(queries, precision, ranges)
  if precision == "int8":
    scores = qq.astype(np.int64) @ qd.astype(np.int64).T
  else:
    xor = np.bitwise_xor(qq.view(np.uint8)[:, None, :], qd.view(np.uint8)[None, :, :])
    scores = -np.bitwise_count(xor).sum(-1).astype(np.int64)
  k = 101
  run = {}
  for qi, qid in enumerate(data.query_ids):
    order = sorted(range(len(docs)), key=lambda i: (-scores[qi, i], i))
    hits = [(i, float(scores[qi, i])) for i in order[:k * max(1, multiplier)]]
    if multiplier:
      if precision == "int8":
        steps = (ranges[1] - ranges[0]) / 255
        deq = (qd.astype(np.float64) + 128) * steps + ranges[0]
      else:
        # packbits - 128 flips each byte's top bit: undo it by XOR.
        deq = np.unpackbits(qd.view(np.uint8) ^ 0x80, axis=1)[:, :DIM].astype(np.float64)
      rescored = [(i, float(deq[i] @ queries[qi].astype(np.float64))) for i, _ in hits]
      hits = sorted(rescored, key=lambda t: -t[1])[:k]
    run[qid] = {data.doc_ids[i]: s for i, s in hits if data.doc_ids[i] != qid}
    run[qid] = dict(list(run[qid].items())[:100])
  return run


@pytest.mark.parametrize("multiplier", [0, 3])
def test_quantized_scores_equal_a_whole_corpus_numpy_reference(folder, multiplier):
  chunk = 40
  got = evaluation.evaluate_data(_encode, folder, quantize=("int8", "binary"), chunk_size=chunk,
                                 rescore_multiplier=multiplier, dims=(16,))
  assert got["bytes_per_vector"] == 4 * DIM and got["dims"]["16"]["bytes_per_vector"] == 64
  assert got["quantize"]["int8"]["bytes_per_vector"] == DIM
  assert got["quantize"]["binary"]["bytes_per_vector"] == 6  # ceil(44 / 8)
  for precision in ("int8", "binary"):
    want = metrics.evaluate_run(_reference_run(folder, precision, chunk, multiplier),
                                folder.qrels)
    row = got["quantize"][precision]
    for key in metrics.METRIC_KEYS:
      assert row[key] == pytest.approx(want[key], abs=1e-12), (precision, key)
    assert row["num_queries"] == want["num_queries"] == 12
  # Quantization costs something, but far from everything.
  assert 0.5 * got["ndcg@10"] < got["quantize"]["int8"]["ndcg@10"] <= 1.0
  assert got["quantize"]["int8"]["ndcg@10"] != got["quantize"]["binary"]["ndcg@10"]


@pytest.mark.slow  # Imports sentence-transformers (torch): ~10 s.
def test_quantize_matches_sentence_transformers_and_scores_hamming_exactly():
  st = pytest.importorskip("sentence_transformers.util.quantization")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, DIM)).astype(np.float32)
  ranges = quantization.int8_ranges(x[:20])
  np.testing.assert_array_equal(quantization.quantize(x, "int8", ranges),
                                st.quantize_embeddings(x, "int8", ranges=ranges))
  binary = quantization.quantize(x, "binary")
  np.testing.assert_array_equal(binary, st.quantize_embeddings(x, "binary"))
  hamming = np.bitwise_count(np.bitwise_xor(binary.view(np.uint8)[:, None],
                                            binary.view(np.uint8)[None])).sum(-1).astype(np.int64)
  np.testing.assert_array_equal(quantization.scores(binary, binary, "binary", DIM), -hamming)
  with pytest.raises(ValueError, match="needs ranges"):
    quantization.quantize(x, "int8")
  with pytest.raises(ValueError, match=r"\['int4'\] not among"):
    quantization.check_precisions(["int8", "int4"])


def test_average_row_carries_the_precisions(folder):
  out = evaluation.evaluate_beir(_encode, [folder], quantize=("binary",))
  assert out["average"]["quantize"]["binary"]["bytes_per_vector"] == 6
  assert out["average"]["quantize"]["binary"]["ndcg@10"] == pytest.approx(
      out[folder.name]["quantize"]["binary"]["ndcg@10"])
  table = evaluation.format_table(out)
  assert f"{folder.name} binary" in table and "bytes/vector" in table


def _launch(script, *args):
  return subprocess.run([sys.executable, f"launch/{script}", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_encode_writes_quantized_embeddings_from_one_float_encoding(tmp_path):
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(["first text", "a second one", "ünïcödé", "short", "q"]) + "\n")
  model = os.path.join(FIXTURE, "native")  # The tiny model: quick to start.
  from moe_embed import inference
  outs = {None: inference.load_embedder(model).encode(texts.read_text().splitlines(),
                                                      show_progress=False)}
  for q in ("int8",):  # Binary is the same call (quantize, checked above) after the encoding.
    out = str(tmp_path / f"{q or 'float'}.npy")
    args = [f"--model={model}", f"--input={texts}", f"--output={out}"]
    proc = _launch("encode.py", *args, *([f"--quantize={q}"] if q else []))
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs[q] = np.load(out)
  ranges = np.load(str(tmp_path / "int8.ranges.npy"))
  np.testing.assert_array_equal(ranges, quantization.int8_ranges(outs[None]))
  np.testing.assert_array_equal(outs["int8"], _np_quantize(outs[None], "int8", ranges))
  assert outs["int8"].dtype == np.int8 and outs["int8"].shape == outs[None].shape


@pytest.mark.parametrize("script,args,needle", [
    ("eval.py", ["--beir=/nonexistent", "--quantize=int4"], "not among"),
    ("eval.py", ["--beir=/nonexistent", "--rescore_multiplier=2"], "needs --quantize"),
    ("encode.py", ["--input={texts}", "--output={out}", "--quantize=int4"], "--quantize"),
    ("encode.py", ["--input={texts}", "--output={out}", "--ranges={texts}"], "--quantize=int8"),
])
def test_bad_quantize_flags_are_one_line(tmp_path, script, args, needle):
  texts = tmp_path / "t.txt"
  texts.write_text("x\n")
  proc = _launch(script, "--model=/no/model",
                 *[a.format(texts=texts, out=tmp_path / "o.npy") for a in args])
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith(("Error", "Flag error"))]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert needle in lines[0], lines[0]

"""ONNX export: the graph equals our JAX encoder, routes like it, and stays sparse.

Dense all-MiniLM-L6-v2 and its upcycled, briefly trained MoE are exported once
each (`--format=onnx --quantize=int8`) and run in onnxruntime on 24 varied texts
in one padded batch (mixed lengths, a one-token text, a text at the 256-token
limit, non-Latin scripts), and on a second batch of another shape through the
same session. The expert matmuls' row counts are read from the running graph:
exactly k rows per real token, none for padding.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_embed import cli
from moe_embed.io import hf_import, st_export
from moe_embed.model import upcycle
from moe_embed.model.encoder import EmbeddingModel
from moe_embed.moe import routing
from moe_embed.tokenizers import load_tokenizer
from tests.reference_models import TEXTS, minilm_folder

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
ort = pytest.importorskip("onnxruntime",
                          reason="onnxruntime is not installed (pip install -e '.[onnx]')")
from moe_embed.io import onnx_export, onnx_runtime  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_TOKEN = "a"  # [CLS] a [SEP]
ONNX_TEXTS = TEXTS + ["", "Ἐν ἀρχῇ ἦν ὁ λόγος", "مرحبا بالعالم"]
assert len(ONNX_TEXTS) >= 24 and ONE_TOKEN in ONNX_TEXTS


def _cosine(a, b):
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class _Exported:
  """One exported folder and what the tests compare it with (JAX computed once, jitted)."""

  def __init__(self, params, config, meta, folder):
    self.params, self.config, self.meta, self.folder = params, config, meta, folder
    self.tokenizer = load_tokenizer(meta["tokenizer"])
    ids, _ = self.tokenizer.encode(ONNX_TEXTS, meta["max_length"])
    self.ids, self.mask = self.tokenizer.pad(ids)  # [25, 256]: every length in one batch.
    self.session = onnx_runtime.session(os.path.join(folder, "onnx", "model.onnx"))
    norm = "attention_norm" if config.norm == "post" else "mlp_norm"  # What the MoE reads.

    def forward(p, ids, mask):
      (emb, _), state = EmbeddingModel(config).apply(
          {"params": p}, ids, mask,
          capture_intermediates=lambda mdl, _: isinstance(mdl, nn.LayerNorm) and mdl.name == norm)
      layers = state["intermediates"]["encoder"]
      return emb, {i: layers[f"layer_{i}"][norm]["__call__"][0] for i in config.moe_layers}

    self._forward = jax.jit(forward)
    self.jax_emb, self.moe_inputs = self.jax(self.ids, self.mask)

  def jax(self, ids, mask):
    """(embeddings [B, d], {MoE layer: its input [B, L, D]}) from our JAX model."""
    emb, inputs = self._forward(self.params, ids, mask)
    return np.asarray(emb), {i: np.asarray(x) for i, x in inputs.items()}

  def onnx_embed(self, sess, ids, mask):
    hidden = sess.run(["last_hidden_state"], onnx_runtime.feeds(sess, ids, mask))[0]
    return onnx_runtime.mean_pool_normalize(hidden, mask)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
  params, config, meta = hf_import.load_hf_folder(minilm_folder())
  folder = str(tmp_path_factory.mktemp("dense") / "export")
  st_export.export(params, config, meta, folder, fmt="onnx", quantize="int8")
  return _Exported(params, config, meta, folder)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
  """all-MiniLM-L6-v2 upcycled to 4 experts, top-2, with per-expert noise and a sharp router."""
  params, config, meta = hf_import.load_hf_folder(minilm_folder())
  params, config = upcycle.upcycle(params, config, num_experts=4, top_k=2, keep_biases=True,
                                   renormalize_topk=True, noise_std=0.02, seed=3)
  for i in config.moe_layers:  # Routing far from uniform, so that each choice matters.
    router = params["encoder"][f"layer_{i}"]["mlp"]["router"]
    router["kernel"] = router["kernel"] * 20
  folder = str(tmp_path_factory.mktemp("moe") / "export")
  st_export.export(params, config, meta, folder, fmt="onnx", quantize="int8")
  return _Exported(params, config, meta, folder)


@pytest.fixture(params=["dense", "moe"])
def exported(request):
  return request.getfixturevalue(request.param)


# Where a test's MoE run adds little beyond the dense one: slow (-m slow runs it).
DENSE_THEN_SLOW_MOE = pytest.mark.parametrize(
    "which", ["dense", pytest.param("moe", marks=pytest.mark.slow)])


def test_folder_holds_both_graphs_with_dynamic_axes(exported):
  assert exported.ids.shape == (len(ONNX_TEXTS), exported.meta["max_length"])
  assert exported.mask.sum(1).max() == exported.meta["max_length"]  # A text at the limit.
  assert exported.mask.sum(1).min() == 2  # The empty text: [CLS] [SEP].
  assert 3 in exported.mask.sum(1)  # The one-token text.
  for name in ("model.onnx", "model_qint8.onnx"):
    assert os.path.isfile(os.path.join(exported.folder, "onnx", name))
  model = onnx.load(os.path.join(exported.folder, "onnx", "model.onnx"))
  onnx.checker.check_model(model)
  inputs = {i.name: i for i in model.graph.input}
  want = ["input_ids", "attention_mask"] + (["token_type_ids"]
                                            if exported.config.type_vocab_size else [])
  assert list(inputs) == want
  for value in model.graph.input:
    assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
  (out,) = model.graph.output
  assert out.name == "last_hidden_state"
  dims = out.type.tensor_type.shape.dim
  assert [d.dim_param for d in dims[:2]] == ["batch", "sequence"]
  assert dims[2].dim_value == exported.config.hidden_size


def test_onnx_equals_jax_on_two_shapes_from_one_graph(exported):
  got = exported.onnx_embed(exported.session, exported.ids, exported.mask)
  assert _cosine(got, exported.jax_emb).min() >= 0.9999, _cosine(got, exported.jax_emb)
  # Another batch size and length through the same session.
  short, _ = exported.tokenizer.encode(ONNX_TEXTS[3:6], 64)
  ids, mask = exported.tokenizer.pad(short)
  assert ids.shape[1] < 64
  got = exported.onnx_embed(exported.session, ids, mask)
  assert _cosine(got, exported.jax(ids, mask)[0]).min() >= 0.9999
  # One text alone, unpadded: a batch of one row skips attention's row slices.
  longest = int(np.argmax(exported.mask.sum(1)))
  alone = exported.onnx_embed(exported.session, exported.ids[longest:longest + 1],
                              exported.mask[longest:longest + 1])
  assert _cosine(alone, exported.jax_emb[longest:longest + 1]).min() >= 0.9999


@DENSE_THEN_SLOW_MOE
def test_onnx_embedder_reads_the_folder_tokenizer_and_prompts(which, request):
  exported = request.getfixturevalue(which)
  embedder = onnx_runtime.OnnxEmbedder(exported.folder)
  assert embedder.max_length == exported.meta["max_length"]
  got = embedder.encode(ONNX_TEXTS, batch_size=4)  # Length-sorted batches of 4.
  assert _cosine(got, exported.jax_emb).min() >= 0.9999
  prompt = exported.meta["query_prefix"] or "query: "
  embedder.prompts["query"] = prompt
  ids, _ = exported.tokenizer.encode([prompt + t for t in ONNX_TEXTS[:4]], 256)
  want = exported.onnx_embed(exported.session, *exported.tokenizer.pad(ids))
  np.testing.assert_allclose(embedder.encode(ONNX_TEXTS[:4], prefix="query"), want, atol=1e-5)


@DENSE_THEN_SLOW_MOE
def test_int8_graph_is_close_to_float32(which, request):
  exported = request.getfixturevalue(which)
  model = onnx.load(os.path.join(exported.folder, "onnx", "model_qint8.onnx"))
  ops = [n.op_type for n in model.graph.node]
  weights = {t.name for t in model.graph.initializer}
  float_matmuls = [n.name for n in model.graph.node
                   if n.op_type == "MatMul" and n.input[1] in weights]
  # Of the weight matmuls only the routers stay float32.
  assert all(name.endswith(onnx_export.FLOAT_MATMULS) for name in float_matmuls), float_matmuls
  cfg = exported.config
  assert len(float_matmuls) == len(cfg.moe_layers)
  # Every other weight matmul of the float32 graph became one MatMulInteger.
  f32 = onnx.load(os.path.join(exported.folder, "onnx", "model.onnx"))
  f32_weights = {t.name for t in f32.graph.initializer}
  f32_matmuls = [n for n in f32.graph.node if n.op_type == "MatMul" and n.input[1] in f32_weights]
  assert ops.count("MatMulInteger") == len(f32_matmuls) - len(float_matmuls) > 2 * cfg.num_layers
  sess = onnx_runtime.session(os.path.join(exported.folder, "onnx", "model_qint8.onnx"))
  got = exported.onnx_embed(sess, exported.ids, exported.mask)
  want = exported.onnx_embed(exported.session, exported.ids, exported.mask)
  cosine = _cosine(got, want)
  assert cosine.min() >= 0.99, cosine
  # Ranges are per token, so a text's int8 embedding does not depend on its batch-mates.
  for j in (int(np.argmin(cosine)), int(np.argmax(exported.mask.sum(1)))):
    n = int(exported.mask[j].sum())
    alone = exported.onnx_embed(sess, exported.ids[j:j + 1, :n], exported.mask[j:j + 1, :n])
    np.testing.assert_allclose(alone[0], got[j], atol=2e-6)


def _pairwise_saturated_product(xq: np.ndarray, q: np.ndarray) -> np.ndarray:
  """xq uint8 [T, in] @ q int8 [in, out] as x86's vpmaddubsw sums it: each pair of
  adjacent products saturated to int16 before the int32 sum (AVX2 without VNNI)."""
  t, n = xq.shape
  pairs = xq.astype(np.int64).reshape(t, 1, n // 2, 2) * q.T.astype(np.int64).reshape(
      1, -1, n // 2, 2)  # [T, out, in/2, 2]
  return np.clip(pairs.sum(-1), -32768, 32767).sum(-1)


def test_int8_matmul_equals_a_numpy_per_token_quantization(tmp_path):
  """One weight MatMul through quantize_int8 against NumPy: uint8 per token over
  [min(x, 0), max(x, 0)], int8 symmetric per column, integer product, both scales.

  The inputs saturate a uint8 x int8 product summed in int16 pairs (onnxruntime's
  kernel on x86 CPUs with AVX2 but no VNNI) in both directions, and give tokens
  zero points at both ends of uint8 (0: no negative value; 255: no positive one)
  and in between."""
  from onnx import TensorProto, helper, numpy_helper
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(48, 24)).astype(np.float32)
  kernel[:, 3] = 0.0  # An all-zero column.
  kernel[:, 5] = 0.7  # Every weight of a column at its maximum: q = 127,
  kernel[:, 6] = -0.7  # and at its minimum: q = -127.
  kernel[::2, 7], kernel[1::2, 7] = 2.0, -2.0  # Alternating signs.
  x = rng.normal(size=(2, 5, 48)).astype(np.float32) * rng.uniform(0.1, 30, (2, 5, 1))
  x[0, 1] = np.abs(x[0, 1])  # No negative value: zero point 0,
  x[0, 2] = -np.abs(x[0, 2])  # no positive one: zero point 255,
  x[0, 3] = 5.0  # every value at the token's maximum: xq = 255 throughout,
  x[0, 4] = -5.0  # and at its minimum: xq = 0, zero point 255.
  x[1, 0, ::2], x[1, 0, 1::2] = 3.0, -3.0  # Both signs at full range.
  x[1, 4] = 0.0  # All zeros (padding).
  x = x.astype(np.float32)
  graph = helper.make_graph(
      [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer_0/mlp/fc1")], "g",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "l", 48])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "l", 24])],
      [numpy_helper.from_array(kernel, "w")])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_export.OPSET)])
  model.ir_version = 8
  src, dst = str(tmp_path / "f32.onnx"), str(tmp_path / "int8.onnx")
  onnx.save_model(model, src)
  onnx_export.quantize_int8(src, dst)
  quantized = onnx.load(dst)
  assert [n.op_type for n in quantized.graph.node].count("MatMul") == 0
  # uint8 x uint8 (weights q + 128, zero point 128): the product that no x86 kernel saturates.
  (product,) = [n for n in quantized.graph.node if n.op_type == "MatMulInteger"]
  consts = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
  assert consts[product.input[1]].dtype == np.uint8 and int(consts[product.input[3]]) == 128
  got = ort.InferenceSession(dst, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

  col = np.abs(kernel).max(0) / 127
  col[col == 0] = 1
  q = np.clip(np.rint(kernel / col), -127, 127)
  rows = x.reshape(-1, 48).astype(np.float64)
  low, high = np.minimum(rows.min(1), 0), np.maximum(rows.max(1), 0)
  scale = np.maximum(high - low, 1e-30) / 255
  zero = np.rint(-low / scale)
  assert {0, 255} <= set(zero[:9].astype(int)) and ((zero > 0) & (zero < 255)).any()
  xq = np.clip(np.rint(rows / scale[:, None]) + zero[:, None], 0, 255)
  exact = xq.astype(np.int64) @ q.astype(np.int64)
  saturated = _pairwise_saturated_product(xq, q)
  # The inputs do saturate an int16-pair product, upwards and downwards.
  assert (saturated < exact).any() and (saturated > exact).any()
  want = (exact - zero[:, None] * q.sum(0)) * scale[:, None] * col
  np.testing.assert_allclose(got.reshape(-1, 24), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  np.testing.assert_array_equal(got[1, 4], 0.0)
  # And the quantization is close to the float product (8 bits: about 1% of its scale).
  exact_float = rows @ kernel
  assert np.abs(want - exact_float).max() <= 0.02 * np.abs(exact_float).max()


def test_moe_graph_routes_each_token_to_the_jax_experts(moe):
  cfg = moe.config
  model = onnx_export.build_model(moe.params, cfg, routing_outputs=True)
  sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  names = [f"layer_{i}/mlp/experts" for i in cfg.moe_layers]
  got = dict(zip(cfg.moe_layers, sess.run(names, onnx_runtime.feeds(sess, moe.ids, moe.mask))))
  real = moe.mask.reshape(-1)
  for i in cfg.moe_layers:
    kernel = moe.params["encoder"][f"layer_{i}"]["mlp"]["router"]["kernel"]
    route = routing.route(moe.moe_inputs[i].reshape(-1, cfg.hidden_size), kernel, real,
                          cfg.top_k, cfg.renormalize_topk)
    want, probs = np.asarray(route.experts)[real], np.asarray(route.probs)[real]
    assert len(np.unique(want)) == cfg.num_experts  # Every expert is used.
    a, b = np.sort(got[i], 1), np.sort(want, 1)  # The graph routes real tokens only.
    differ = np.flatnonzero((a != b).any(1))
    # A swap is allowed only at a float32 tie between the k-th and the next expert.
    p = np.sort(probs[differ], 1)[:, ::-1]
    assert (p[:, cfg.top_k - 1] - p[:, cfg.top_k] < 1e-5).all(), (i, differ)
    assert len(differ) <= 2, (i, differ)


def test_moe_graph_gives_the_same_bits_every_run(moe):
  # The combine gathers each token's k expert rows: a ScatterND adding duplicate
  # indices races in onnxruntime's CPU threads (run-to-run differences up to 4).
  model = onnx.load(os.path.join(moe.folder, "onnx", "model.onnx"))
  assert not [n.name for n in model.graph.node if n.op_type.startswith("Scatter")
              and any(a.name == "reduction" for a in n.attribute)]
  sess = onnx_runtime.session(os.path.join(moe.folder, "onnx", "model.onnx"), threads=2)
  runs = [sess.run(["last_hidden_state"], onnx_runtime.feeds(sess, moe.ids, moe.mask))[0]
          for _ in range(8)]
  for run in runs[1:]:
    np.testing.assert_array_equal(run, runs[0])


def _expert_rows(exp: _Exported, ids, mask) -> dict[str, int]:
  """{expert matmul node: rows it multiplied}, read from the graph as it runs."""
  model = onnx.load(os.path.join(exp.folder, "onnx", "model.onnx"))
  nodes = [n for n in model.graph.node if "/expert_" in n.name]
  for n in nodes:
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.input[0]))
  sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  values = sess.run([n.input[0] for n in nodes], onnx_runtime.feeds(sess, ids, mask))
  return {n.name: v.shape[0] for n, v in zip(nodes, values)}


def test_moe_graph_multiplies_only_the_routed_rows(moe):
  cfg = moe.config
  model = onnx.load(os.path.join(moe.folder, "onnx", "model.onnx"))
  matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
  # Every expert weight is one expert's [D, F] or [F, D]: no stacked all-experts tensor.
  shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
  e, d, f = cfg.num_experts, cfg.hidden_size, cfg.mlp_dim
  experts = [n for n in matmuls if "/expert_" in n.name]
  assert len(experts) == 2 * e * len(cfg.moe_layers)
  assert {shapes[n.input[1]] for n in experts} == {(d, f), (f, d)}
  assert not any(len(s) == 3 and s[0] == e for s in shapes.values())
  rows = _expert_rows(moe, moe.ids, moe.mask)
  real, slots = int(moe.mask.sum()), moe.mask.size
  assert slots > 2 * real  # Padding enough to show if it were routed.
  for i in cfg.moe_layers:
    w1 = [rows[f"layer_{i}/mlp/expert_{x}/w1"] for x in range(e)]
    assert sum(w1) == cfg.top_k * real, (i, w1)  # k rows per real token, none for padding.
    assert [rows[f"layer_{i}/mlp/expert_{x}/w2"] for x in range(e)] == w1
  flops = sum(2 * n * d * f for n in rows.values())
  all_experts = 2 * e * slots * d * f * 2 * len(cfg.moe_layers)  # Every expert, every slot.
  assert flops * e * slots == all_experts * cfg.top_k * real
  assert flops / all_experts < cfg.top_k / e / 2


def test_export_is_written_aside_and_a_failure_leaves_nothing(tmp_path, monkeypatch):
  params, config, meta = hf_import.load_hf_folder(minilm_folder())

  def fail(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(onnx_export, "write_onnx", fail)
  out = tmp_path / "export"
  with pytest.raises(RuntimeError, match="disk full"):
    st_export.export(params, config, meta, str(out), fmt="onnx")
  assert os.listdir(tmp_path) == []  # Neither the folder nor its aside copy.


def _launch(*args):
  env = dict(os.environ)
  env.pop(cli.TRACEBACK_ENV, None)
  return subprocess.run([sys.executable, "launch/export.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,needle", [
    (["--format=tflite"], "--format"),
    (["--format=onnx", "--quantize=int4"], "--quantize"),
    (["--quantize=int8"], "--format=onnx"),
    pytest.param(["--format=onnx", "--model={tmp}"], "is not a model", marks=pytest.mark.slow),
    pytest.param(["--format=onnx", "--out={file}/out"], "is a file, not a folder",
                 marks=pytest.mark.slow),
])
def test_export_bad_input_is_one_line(args, needle, tmp_path):
  (tmp_path / "file").write_text("")
  defaults = {"--model": minilm_folder(), "--out": str(tmp_path / "out")}
  for a in args:
    defaults[a.split("=")[0]] = a.split("=", 1)[1].format(tmp=tmp_path, file=tmp_path / "file")
  proc = _launch(*[f"{k}={v}" for k, v in defaults.items()])
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith(("Error", "Flag error"))]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert needle in lines[0], lines[0]
  assert not (tmp_path / "out").exists()


def test_p_norm_routing_and_nomic_placement_equal_jax():
  """renormalize_topk=2 (megablocks' p-norm) and MoE at i % 3 == 1, in a small random model."""
  from moe_embed.model.encoder import EmbeddingModel as Model
  from moe_embed.model import config as model_config
  from moe_embed.model.encoder import init_params
  cfg = model_config.preset("tiny", vocab_size=300, num_layers=2, moe_every_n_layers=3,
                            moe_layer_offset=1, renormalize_topk=2, num_experts=4)
  assert cfg.moe_layers == (1,)  # Dense with our placement (layer 2 of 3 would be MoE).
  params = nn.meta.unbox(jax.jit(lambda key: init_params(cfg, key))(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape).astype(
      np.float32), params)
  model = onnx_export.build_model(params, cfg)
  sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  ids = rng.integers(4, 300, size=(3, 11))
  mask = np.arange(11)[None, :] < np.array([[11], [6], [2]])
  hidden = sess.run(["last_hidden_state"], onnx_runtime.feeds(sess, ids, mask))[0]
  got = onnx_runtime.mean_pool_normalize(hidden, mask)
  want, _ = jax.jit(Model(cfg).apply)({"params": params}, ids, mask)
  assert _cosine(got, np.asarray(want)).min() >= 0.9999


def test_large_weights_go_to_external_data_beside_the_graph(dense, tmp_path, monkeypatch):
  monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 1000)  # As a 2 GB model would.
  path = str(tmp_path / "onnx" / "model.onnx")
  onnx_export.save(onnx_export.build_model(dense.params, dense.config), path)
  assert os.path.getsize(path) < 1_000_000
  assert os.path.getsize(path + "_data") > 80_000_000
  ids, mask = dense.ids[:4, :40], dense.mask[:4, :40]
  got = dense.onnx_embed(onnx_runtime.session(path), ids, mask)
  np.testing.assert_allclose(got, dense.onnx_embed(dense.session, ids, mask), atol=1e-6)

"""Ahead-of-time compilation for TPU slices (moe_embed/train/aot.py, launch/compile.py).

libtpu (the [tpu] extra) compiles for TPU topologies on this CPU machine. The
small programs here are the tiny preset cut to its first two layers (one dense,
one MoE) or one MoE layer, so each compile takes tens of seconds; the
nomic_v2_moe compiles are marked slow and their figures live in the README.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import finetune, pretrain
from moe_embed.data import packing
from moe_embed.model import param_count
from moe_embed.model.config import EncoderConfig
from tests.hlo_ops import compiled_result_bytes, lowered_operand_shapes

pytest.importorskip("libtpu")

from moe_embed.train import aot  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(expert=4, exchange="auto", layers=2):
  c = finetune.get_config("tiny")
  c.encoder.num_layers = layers
  c.batch_size, c.input.max_query_len, c.input.max_doc_len = 16, 16, 16
  c.mesh.expert = expert
  c.encoder.expert_exchange = exchange
  return c


@pytest.fixture(scope="module")
def v5p8():
  topology = aot.parse_topology("v5p-8")
  return topology, aot.topology_devices(topology)


@pytest.fixture(scope="module")
def ragged_ep4(v5p8):
  """The tiny step with mesh.expert=4 compiled for 4 v5p chips: (config, report, HLO text)."""
  config = _tiny()
  result, compiled = aot.compile_step(config, *v5p8)
  return config, result, compiled.as_text()


def test_accelerator_types_and_topology_strings_name_the_chips(v5p8):
  topology, devices = v5p8
  assert (topology.chips, topology.libtpu_name, len(devices)) == (4, "v5p:2x2x1", 4)
  assert {d.platform for d in devices} == {"tpu"}
  assert aot.parse_topology("v5p-64").libtpu_name == "v5p:2x4x4"
  assert aot.parse_topology("v4-32").libtpu_name == "v4:2x2x4"  # 32 TensorCores, 16 chips.
  assert aot.parse_topology("v6e-8").libtpu_name == "v6e:2x4"  # 8 chips.
  assert aot.parse_topology("v5litepod-16").libtpu_name == "v5e:4x4"
  assert aot.parse_topology("v6e:2x2").chips == 4
  # Every accelerator type of the tables in the README, as libtpu builds it.
  for name, chips in (("v4-32", 16), ("v6e-8", 8), ("v5p-64", 32)):
    assert len(aot.topology_devices(aot.parse_topology(name))) == chips


def test_ep4_step_for_tpu_holds_ragged_all_to_all_and_ragged_dot(ragged_ep4):
  _, result, hlo = ragged_ep4
  assert "ragged-all-to-all" in hlo and "ragged-dot" in hlo
  assert result["collective_bytes"]["ragged-all-to-all"] > 0
  assert result["fits"] and result["chips"] == 4
  mem = result["memory_bytes_per_chip"]
  assert 0 < mem["params_and_optimizer"] < mem["total"] <= result["hbm_bytes_per_chip"]
  config = _tiny()  # The finetune recipe's 10 hard negatives are in the batch.
  assert result["model_flops_per_step"] == param_count.train_step_flops(
      EncoderConfig.from_dict(dict(config.encoder)), 16, 16, 16, config.input.num_negatives)
  assert config.input.num_negatives == 10


def test_step_time_is_xla_estimate_scaled_for_its_loops(ragged_ep4):
  """XLA times the routed step (no scatter from top_k's gradient to defeat its cost
  model); the tiny step has no GradCache loop, so its estimate is XLA's own."""
  _, result, _ = ragged_ep4
  assert result["xla_optimal_seconds"] > 0 and result["loop_flop_ratio"] == 1.0
  assert result["estimated_step_s"] == result["xla_optimal_seconds"]
  assert result["step_estimate"] == "xla_cost_model"
  assert 0 < result["estimated_mfu"] < 1
  # Where both exist, the roofline of XLA's cost analysis is near its cost model's time.
  assert 0.5 < result["roofline_seconds"] / result["xla_optimal_seconds"] < 2


def test_step_time_falls_back_to_the_roofline_where_xla_gives_none():
  """v5e's cost model answers -3 s for the tiny step; the estimate is then the roofline
  of the compiled program's FLOPs and bytes at v5e's published peak and bandwidth."""
  result, compiled = aot.compile_step(_tiny(expert=1), aot.parse_topology("v5e-4"))
  assert result["xla_optimal_seconds"] <= 0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  expected = max(cost["flops"] / 197e12, cost["bytes accessed"] / 819e9)
  assert result["step_estimate"] == "roofline"
  assert result["estimated_step_s"] == pytest.approx(expected * result["loop_flop_ratio"])
  # XLA's FLOPs include what the model FLOPs leave out (optimizer, norms): MFU below 1.
  assert 0 < result["estimated_mfu"] < 1
  assert result["estimated_tokens_per_s_per_chip"] == pytest.approx(
      result["tokens_per_step"] / result["estimated_step_s"] / 4)


def test_loop_flop_ratio_counts_each_iteration_of_a_loop():
  import jax
  import jax.numpy as jnp

  def loss(a, b):  # Four [64, 32] x [32, 32] matmuls in a loop, one outside it.
    return jax.lax.fori_loop(0, 4, lambda i, c: jnp.tanh(c @ b), a).sum() + (a @ b).sum()

  a, b = jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 32), jnp.float32)
  hlo = jax.jit(loss).lower(a, b).compiler_ir("hlo").as_hlo_text()
  per_step, once = aot._loop_weighted(hlo, aot._dot_flops)
  matmul = 2 * 64 * 32 * 32
  assert (per_step["flops"], once["flops"]) == (5 * matmul, 2 * matmul)
  assert aot.loop_flop_ratio(hlo) == 2.5


def test_packed_step_compiles_with_rows_sized_for_a_length_mix(v5p8):
  """input.packing: rows per unit from the share (or --pack_rows), FLOPs of real tokens."""
  config = _tiny(expert=1, layers=1)
  config.input.packing = True
  # Without a length mix: rows for every text at its full width (an upper bound: the
  # padded step's token slots, one 16-token text per 16-token row).
  full = aot.build_step(config, v5p8[1]).batch["packed_ids"].shape[0] // 4
  assert full == 4 + 44
  rows = aot.pack_rows_for_share(config, 4, 0.5)
  # 16 queries over 4 devices: 4 per unit with 4 x 11 documents, 8 tokens each in rows of 16.
  assert rows == int(np.ceil(np.ceil((4 + 44) / 2) * packing.ROW_HEADROOM))
  result, compiled = aot.compile_step(config, *v5p8, real_token_share=0.5)
  assert result["packed_rows"] == 4 * rows and result["fits"]
  assert result["estimated_step_s"] > 0
  assert result["model_flops_per_step"] == aot._model_flops(
      config, EncoderConfig.from_dict(dict(config.encoder)), 0.5)
  assert result["tokens_per_step"] == 16 * (16 + 11 * 16) // 2
  assert f"s32[{rows},16]" in compiled.as_text()  # One device's rows.


def test_replicated_experts_compute_each_chips_own_assignments(v5p8):
  """mesh.expert=1: each chip routes and multiplies its own tokens' T x K / chips
  assignments, and no all-gather or all-reduce grows with the tokens.

  Compiled at two text lengths with the same texts: collectives that carry tokens
  (every chip's expert assignments, gathered for a global dispatch) would double;
  those of the loss (embeddings, one per text) and the gradients stay.
  """
  collectives = {}
  for length in (16, 32):
    config = _tiny(expert=1)
    config.input.packing = False
    config.input.max_query_len = config.input.max_doc_len = length
    k, texts = config.encoder.top_k, 16 * (1 + config.input.num_negatives)
    _, lowered = aot.lower_step(config, *v5p8)
    # The grouped matmuls' rows (the first operand's, forward and backward): one chip's.
    rows = {shapes[0][0] for shapes in lowered_operand_shapes(lowered, "chlo.ragged_dot")}
    assert rows == {16 * length * k // 4, texts * length * k // 4}, (length, rows)
    compiled = lowered.compile()
    collectives[length] = sorted(compiled_result_bytes(compiled, ("all-gather", "all-reduce")))
  assert collectives[16] == collectives[32]


def test_tpu_step_attends_with_splash_attention_and_no_length_squared_tensor(v5p8):
  """encoder.attention='auto' on TPU: packed rows go through the splash kernel with
  segment ids; no [..., L, L] scores or mask of XLA's attention is left in the
  program (L = 40, a width no other tensor of the tiny step has). 'xla' has them."""
  squared = {}
  for kernel in ("auto", "xla"):
    config = _tiny(expert=1)
    config.input.packing = True
    config.input.max_query_len = config.input.max_doc_len = 40
    config.encoder.attention = kernel
    result, compiled = aot.compile_step(config, *v5p8, real_token_share=0.5)
    assert result["fits"]
    text = compiled.as_text()
    squared[kernel] = set(re.findall(r"\b[a-z0-9]+\[[0-9,]*\b40,40\]", text))
    if kernel == "auto":
      assert "tpu_custom_call" in text
  assert not squared["auto"], squared["auto"]
  assert any(s.startswith("f32[") for s in squared["xla"]), squared["xla"]


def test_padded_exchange_lowers_no_ragged_all_to_all(v5p8):
  _, lowered = aot.lower_step(_tiny(exchange="padded"), *v5p8)
  text = lowered.as_text()
  assert "ragged_all_to_all" not in text and "all_to_all" in text
  assert "ragged_dot" in text  # The TPU kernel all the same.


def test_parameter_bytes_are_the_parameter_count_over_the_shards(ragged_ep4):
  """params + AdamW moments, float32: 3 x 4 bytes per value; experts split over EP=4."""
  config, result, _ = ragged_ep4
  encoder = EncoderConfig.from_dict(dict(config.encoder))
  boxed = param_count.abstract_params(encoder)
  total = param_count.count_params(boxed)
  experts = total - sum(size for size, names in param_count._leaves_with_names(boxed)
                        if not names or names[0] != "exp")
  expected = 3 * 4 * ((total - experts) + experts // 4 + 1)  # + the log temperature
  reported = result["memory_bytes_per_chip"]["params_and_optimizer"]
  assert experts > 0
  # The rest: the step and the optimizer's int32 step counts (a few scalars).
  assert 0 <= reported - expected <= 64


_HLO = """HloModule step, entry_computation_layout={()->()}

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %x = f32[64,32]{1,0} get-tuple-element((s32[], f32[64,32]) %p), index=1
  %ar = f32[64,32]{1,0} all-reduce(f32[64,32]{1,0} %x), replica_groups={{0,1,2,3}}, to_apply=%add
  %r = bf16[400,8]{1,0} ragged-all-to-all(bf16[100,8]{1,0} %y, bf16[400,8]{1,0} %z, s32[4]{0} %o)
  ROOT %t = (s32[], f32[64,32]) tuple(s32[] %i, f32[64,32]{1,0} %ar)
}

%cond (p: (s32[], f32[64,32])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[16,8]) -> f32[64,8] {
  %ags = (f32[16,8]{1,0}, f32[64,8]{1,0}) all-gather-start(f32[16,8]{1,0} %a), dimensions={0}
  %ag = f32[64,8]{1,0} all-gather-done((f32[16,8]{1,0}, f32[64,8]{1,0}) %ags)
  %w = (s32[], f32[64,32]) while((s32[], f32[64,32]) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = (bf16[4,8]{1,0}, s8[2]{0}) reduce-scatter(bf16[16,8]{1,0} %b, s8[8]{0} %c), dimensions={0}, to_apply=%add
  ROOT %out = f32[64,8]{1,0} copy(f32[64,8]{1,0} %ag)
}
"""


def test_collective_bytes_count_loop_iterations_async_pairs_and_ragged_send_buffers():
  assert aot.collective_bytes(_HLO) == {
      "all-reduce": 3 * 64 * 32 * 4,  # In a while body run 3 times.
      "all-gather": 64 * 8 * 4,  # The -start/-done pair once, at its result.
      "all-to-all": 0,
      "ragged-all-to-all": 3 * 100 * 8 * 2,  # The [100, 8] send buffer, not the receive one.
      "reduce-scatter": 4 * 8 * 2 + 2,  # A tuple result: both arrays.
  }


def _compile_cli(*flags, json_path=None, timeout=900):
  cmd = [sys.executable, os.path.join(REPO, "launch", "compile.py"), *flags]
  if json_path:
    cmd.append(f"--json={json_path}")
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


# One MoE layer of the tiny model at 4,096 x 512 tokens: about 150 GiB of
# temporaries per chip on 4 v5e chips (16 GiB each) without GradCache.
_TOO_BIG = ("--config=configs/finetune.py:tiny", "--topology=v5e-4",
            "--config.encoder.num_layers=1", "--config.encoder.moe_every_n_layers=1",
            "--config.encoder.remat=true", "--config.batch_size=4096",
            "--config.input.max_query_len=512", "--config.input.max_doc_len=512")


def test_step_that_cannot_fit_exits_1_with_one_line(tmp_path):
  out = _compile_cli(*_TOO_BIG, json_path=str(tmp_path / "r.json"))
  assert out.returncode == 1, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert "GiB more than its 16 GiB HBM" in lines[0] and "grad_cache_chunk" in lines[0]
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["fits"] is False and report["memory_bytes_per_chip"]["total"] > 16 * 2 ** 30


_CANDIDATE = re.compile(r"^  --config\.grad_cache_chunk=(\d+) --config\.encoder\.remat=(true|false): "
                        r"([0-9.]+) GiB per chip \((fits|does not fit)\), (?:est\. ([0-9.e+-]+) s|no estimate)")


def _candidates(stdout: str) -> dict[tuple[int, bool], tuple[bool, float]]:
  """(chunk, remat) -> (fits, estimated step s) of each candidate --fit printed."""
  found = {}
  for line in stdout.splitlines():
    if m := _CANDIDATE.match(line):
      found[(int(m.group(1)), m.group(2) == "true")] = (
          m.group(4) == "fits", float(m.group(5)) if m.group(5) else float("inf"))
  return found


@pytest.mark.slow
def test_fit_finds_a_grad_cache_chunk_that_compiles_within_hbm(tmp_path):
  """Several compiles (GradCache chunks with and without remat): slow on 2 cores."""
  out = _compile_cli(*_TOO_BIG, "--fit", json_path=str(tmp_path / "r.json"), timeout=3600)
  assert out.returncode == 0, out.stderr
  line = next(l for l in out.stdout.splitlines() if l.startswith("Fits with:"))
  flags = line.removeprefix("Fits with:").split()
  assert flags and all(f.startswith("--config.") for f in flags)
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["fits"] and report["memory_bytes_per_chip"]["total"] <= 16 * 2 ** 30
  # The report is that of the config the printed overrides make.
  chunk = int(next(f for f in flags if "grad_cache_chunk" in f).split("=")[1])
  assert report["grad_cache_chunk"] == chunk and 4096 % chunk == 0
  # For its remat setting, twice the chunk was tried and did not fit.
  tried = _candidates(out.stdout)
  assert tried[(2 * chunk, report["remat"])][0] is False


def test_fit_prints_every_candidate_and_picks_the_fastest_that_fits(v5p8, tmp_path):
  """The tiny step on 4 v5p chips fits with and without GradCache and remat: --fit
  compiles candidates of both remat settings and keeps the one with the lowest
  estimate among those that fit, whichever the config started from."""
  flags = ("--config=configs/finetune.py:tiny", "--topology=v5p-8",
           "--config.encoder.num_layers=1", "--config.batch_size=16",
           "--config.input.max_query_len=16", "--config.input.max_doc_len=16",
           "--config.input.packing=false", "--config.grad_cache_chunk=4",
           "--config.encoder.remat=true")
  out = _compile_cli(*flags, "--fit", json_path=str(tmp_path / "r.json"))
  assert out.returncode == 0, out.stderr
  tried = _candidates(out.stdout)
  assert {remat for _, remat in tried} == {False, True} and len(tried) >= 3, out.stdout
  report = json.loads((tmp_path / "r.json").read_text())
  assert (4, True) in tried  # The config's own compile is a candidate too.
  fitting = [step for fits, step in tried.values() if fits]
  assert report["fits"] and report["estimated_step_s"] <= min(fitting) * (1 + 1e-3)
  # Without GradCache and remat, one pass instead of five forwards: the fastest here.
  assert (report["grad_cache_chunk"], report["remat"]) == (0, False)
  line = next(l for l in out.stdout.splitlines() if l.startswith("Fits with:"))
  assert line.split() == ["Fits", "with:", "--config.grad_cache_chunk=0",
                          "--config.encoder.remat=false"]


def test_misspelt_topology_is_one_line_listing_valid_names():
  out = _compile_cli("--config=configs/finetune.py:tiny", "--topology=v5p-7")
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert "'v5p-7'" in lines[0] and "v5p-8" in lines[0] and "v6e-8" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,topology", [(finetune, "v5p-8"), (pretrain, "v5p-64")])
def test_paper_recipes_fit_their_slices(recipe, topology):
  """The shipped nomic_v2_moe recipes compile within HBM for the slices their docstrings
  name (minutes per compile; the figures are in the README)."""
  result, _ = aot.compile_step(recipe.get_config("nomic_v2_moe"), aot.parse_topology(topology))
  assert result["fits"], result["memory_bytes_per_chip"]
  assert np.isfinite(result["model_flops_per_step"])

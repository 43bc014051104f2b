"""Export to a sentence-transformers / transformers folder on plain PyTorch.

The exported dense all-MiniLM-L6-v2 and its upcycled, briefly trained MoE give
the JAX embeddings in sentence-transformers (also at a Matryoshka dim and with
the query prompt); export then import gives the same embeddings; the torch MoE
block equals a per-token loop, forward and backward.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_embed import inference
from moe_embed.io import hf_import, model_folder, st_export
from moe_embed.model import upcycle
from moe_embed.model.encoder import EmbeddingModel
from moe_embed.tokenizers import load_tokenizer
from tests.reference_models import TEXTS, minilm_folder

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# 20 varied texts: empty, long (truncated), non-Latin, code, emoji.
EXPORT_TEXTS = [""] + TEXTS[:15] + TEXTS[17:19] + TEXTS[20:]
assert len(EXPORT_TEXTS) == 20


def _torch():
  return pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[export]')")


def _sentence_transformers():
  _torch()
  return pytest.importorskip("sentence_transformers",
                             reason="sentence-transformers is not installed (pip install -e '.[export]')")


def _assert_same_embeddings(a, b, floor=0.9999):
  cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  assert cosine.min() >= floor, cosine


def _compare_with_jax(folder, embedder, dim):
  """sentence-transformers on the exported folder vs our JAX embedder: plain, query, dim."""
  st = _sentence_transformers()
  full = st.SentenceTransformer(folder, device="cpu", trust_remote_code=True)
  truncated = st.SentenceTransformer(folder, device="cpu", trust_remote_code=True,
                                     truncate_dim=dim)
  for prompt in (None, "query"):
    want = embedder.encode(EXPORT_TEXTS, prefix=prompt or "", show_progress=False)
    got = full.encode(EXPORT_TEXTS, prompt_name=prompt, batch_size=7)
    _assert_same_embeddings(got, want)
    want = embedder.encode(EXPORT_TEXTS, prefix=prompt or "", dim=dim, show_progress=False)
    got = truncated.encode(EXPORT_TEXTS, prompt_name=prompt, batch_size=7)
    assert got.shape == (len(EXPORT_TEXTS), dim)
    _assert_same_embeddings(got, want)


def _embedder(params, config, meta):
  return inference.Embedder(config, params, load_tokenizer(meta["tokenizer"]),
                            max_length=meta["max_length"], query_prefix=meta["query_prefix"],
                            doc_prefix=meta["doc_prefix"])


@pytest.mark.torch
def test_dense_minilm_export_matches_jax(tmp_path):
  params, config, meta = hf_import.load_hf_folder(minilm_folder())
  meta = {**meta, "query_prefix": "query: ", "doc_prefix": "passage: "}
  st_export.export(params, config, meta, str(tmp_path), matryoshka_dims=[384, 128])
  _compare_with_jax(str(tmp_path), _embedder(params, config, meta), 128)
  # The folder reads back: same config, the prompts as prefixes, the same embeddings.
  loaded, loaded_config, loaded_meta = model_folder.load_any(str(tmp_path))
  assert loaded_config == config
  assert (loaded_meta["query_prefix"], loaded_meta["max_length"]) == ("query: ", 256)
  a = _embedder(params, config, meta).encode(EXPORT_TEXTS, prefix="query", show_progress=False)
  b = _embedder(loaded, loaded_config, loaded_meta).encode(EXPORT_TEXTS, prefix="query",
                                                           show_progress=False)
  np.testing.assert_allclose(a, b, atol=1e-6)


def _trained_moe(steps=3):
  """all-MiniLM-L6-v2 upcycled (released settings), then a few InfoNCE steps."""
  params, config, meta = hf_import.load_hf_folder(minilm_folder())
  params, config = upcycle.upcycle(params, config, num_experts=4, top_k=2, seed=1)
  tok = load_tokenizer(meta["tokenizer"])
  queries, docs = TEXTS[1:9], TEXTS[9:17]
  q = tok.pad(tok.encode(queries, 64)[0], 64)
  d = tok.pad(tok.encode(docs, 64)[0], 64)
  model = EmbeddingModel(config)

  def loss_fn(p):
    zq, _ = model.apply({"params": p}, q[0], q[1])
    zd, _ = model.apply({"params": p}, d[0], d[1])
    logits = zq @ zd.T / 0.05  # [8, 8]
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(8)).mean()

  opt = optax.adam(1e-3)
  state = opt.init(params)
  grad = jax.jit(jax.grad(loss_fn))
  start = params
  for _ in range(steps):
    updates, state = opt.update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
  moved = np.abs(params["encoder"]["layer_1"]["mlp"]["router"]["kernel"]
                 - start["encoder"]["layer_1"]["mlp"]["router"]["kernel"]).max()
  assert moved > 1e-4  # The router is off its initialisation.
  meta = {**meta, "query_prefix": "search_query: ", "doc_prefix": "search_document: "}
  return jax.tree.map(np.asarray, params), config, meta


@pytest.mark.torch
def test_trained_moe_export_matches_jax_and_round_trips(tmp_path):
  params, config, meta = _trained_moe()
  native = str(tmp_path / "native")
  model_folder.save_model_folder(native, params, config, tokenizer_path=meta["tokenizer"],
                                 query_prefix=meta["query_prefix"], doc_prefix=meta["doc_prefix"],
                                 max_length=meta["max_length"])
  out = str(tmp_path / "export")
  st_export.export_model(native, out, matryoshka_dims=[384, 256])
  embedder = _embedder(params, config, meta)
  _compare_with_jax(out, embedder, 256)
  loaded, loaded_config, loaded_meta = model_folder.load_any(out)
  assert loaded_config == config
  assert loaded_meta["doc_prefix"] == "search_document: "
  a = embedder.encode(EXPORT_TEXTS, prefix="document", show_progress=False)
  b = _embedder(loaded, loaded_config, loaded_meta).encode(EXPORT_TEXTS, prefix="document",
                                                           show_progress=False)
  np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.torch
def test_auto_model_loads_offline_in_float32_and_bfloat16(tmp_path):
  torch = _torch()
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  params, config, meta = _trained_moe(steps=1)
  st_export.export(params, config, meta, str(tmp_path), matryoshka_dims=[384, 256])
  import json
  written = json.load(open(tmp_path / "config.json"))
  assert written["moe_layers"] == [1, 3, 5] and written["moe_top_k"] == 2
  assert written["num_active_parameters"] < written["num_parameters"]
  assert written["matryoshka_dims"] == [384, 256]
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  model = transformers.AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
  assert type(model).__name__ == "MoeEmbedModel"
  texts = [meta["query_prefix"] + t for t in EXPORT_TEXTS]
  batch = tok(texts, padding=True, truncation=True, max_length=meta["max_length"],
              return_tensors="pt")

  def embed(m, dtype):
    with torch.no_grad():
      hidden = m(**batch).last_hidden_state.float()  # [B, L, D]
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()

  want = _embedder(params, config, meta).encode(EXPORT_TEXTS, prefix="query", show_progress=False)
  _assert_same_embeddings(embed(model, torch.float32), want)
  model_bf16 = transformers.AutoModel.from_pretrained(
      str(tmp_path), trust_remote_code=True, dtype=torch.bfloat16).eval()
  assert model_bf16.encoder.layers[1].mlp.experts.mlp.w1.dtype == torch.bfloat16
  _assert_same_embeddings(embed(model_bf16, torch.bfloat16), want, floor=0.99)


def _load_modeling():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "modeling_moe_embed", os.path.join(os.path.dirname(st_export.__file__),
                                         st_export.MODELING_FILE))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.torch
@pytest.mark.parametrize("options", [
    dict(), dict(moe_normalize_expert_weights=True, moe_expert_w1_bias=True),
    dict(moe_normalize_expert_weights=2), dict(activation_function="swiglu", moe_top_k=1)])
def test_torch_moe_block_equals_a_per_token_loop(options):
  torch = _torch()
  _transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  modeling = _load_modeling()
  config = modeling.MoeEmbedConfig(n_embd=16, n_inner=24, num_experts=5, moe_top_k=2,
                                   **{k: v for k, v in options.items() if k != "moe_top_k"})
  config.moe_top_k = options.get("moe_top_k", 2)
  torch.manual_seed(0)
  block = modeling.MoeMlp(config).double()
  for p in block.parameters():
    torch.nn.init.normal_(p, std=0.3)
  x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
  mask = torch.arange(7)[None, :] < torch.tensor([[7], [4], [1]])
  y = block(x, mask)

  def reference(x):
    """Every real token through its top-k experts one at a time."""
    e, f, k = config.num_experts, config.n_inner, config.moe_top_k
    w = block.experts.mlp
    rows = []
    for b in range(x.shape[0]):
      for t in range(x.shape[1]):
        out = block.experts.bias.clone()
        if mask[b, t]:
          # The router runs in float32 in the block (as in JAX): so does the reference.
          probs = torch.softmax(block.router.layer.weight.float() @ x[b, t].float(), -1).double()
          top = sorted(range(e), key=lambda i: -probs[i].item())[:k]
          p = float(config.moe_normalize_expert_weights)  # megablocks: the p-norm.
          total = sum(probs[i] ** p for i in top) ** (1 / p) if p else 1.0
          for i in top:
            h = w.w1[i * f:(i + 1) * f] @ x[b, t]
            if w.w1_bias is not None:
              h = h + w.w1_bias[i]
            if w.v1 is not None:
              h = torch.nn.functional.silu(h) * (w.v1[i * f:(i + 1) * f] @ x[b, t])
            else:
              h = torch.nn.functional.gelu(h)
            weight = probs[i] / total if config.moe_normalize_expert_weights else probs[i]
            out = out + weight * (w.w2[i * f:(i + 1) * f].T @ h)
        rows.append(out)
    return torch.stack(rows).view(x.shape)

  want = reference(x)
  torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)  # float32 router rounding.
  cotangent = torch.randn_like(y)
  params = [x] + list(block.parameters())
  grads = torch.autograd.grad((y * cotangent).sum(), params)
  grads_want = torch.autograd.grad((want * cotangent).sum(), params)
  for got, ref in zip(grads, grads_want):
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
  # bfloat16 parameters and inputs: the same function to bfloat16 precision.
  y16 = block.to(torch.bfloat16)(x.detach().to(torch.bfloat16), mask)
  torch.testing.assert_close(y16.double(), want.detach(), rtol=0.05, atol=0.05)


@pytest.mark.torch
def test_sentencepiece_tokenizer_converts_to_the_same_ids(tmp_path):
  transformers = pytest.importorskip("transformers", reason="transformers is not installed")
  from moe_embed.tokenizers import train_sentencepiece
  # The long repetitive texts stay out of training: copies of a periodic string make
  # SentencePiece's frequent-substring search take minutes. They are still encoded.
  corpus = [t for t in TEXTS if len(t) < 1000] * 20 + [
      f"sentence number {i} about topic {i % 7}" for i in range(500)]
  sp = train_sentencepiece(corpus, 300, str(tmp_path / "sp"))
  st_export.write_tokenizer(sp.path, str(tmp_path), 64)
  converted = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  want, _ = sp.encode(EXPORT_TEXTS, 64)
  got = converted(EXPORT_TEXTS, truncation=True, max_length=64)["input_ids"]
  assert got == want
  assert converted.pad_token_id == sp.pad_id

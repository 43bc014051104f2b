"""Models on disk: one model-folder format, Orbax train checkpoints, Hugging Face in and out.

  checkpoints   Orbax train state + data position; newest parameters of a workdir
  hf_import     BERT / XLM-RoBERTa / nomic-bert folders -> our parameter tree
  hf_export     our parameter tree -> the nomic-bert layout
  model_folder  model.json + weights: read, write, and `load_any` for --model
  onnx_export   our parameter tree -> an ONNX graph whose MoE layers stay sparse (top-k only)
  st_export     any model -> a sentence-transformers / transformers folder on plain PyTorch,
                optionally with that ONNX graph (float32, int8)
  onnx_runtime  embeddings from such a folder's ONNX graph in onnxruntime
  modeling_moe_embed  the standalone PyTorch encoder copied into that folder (torch and
                transformers only; never imported by the package)

Imports: `moe_embed.model.config`, and this package's modules in the order listed.
"""

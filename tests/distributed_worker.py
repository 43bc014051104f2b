"""One process of a multi-process CPU run (started by tests/test_multiprocess.py).

usage: distributed_worker.py PORT PROCESS_ID NUM_PROCESSES DATA_DIR WORKDIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main():
  port, process_id, num_processes, data_dir, workdir = sys.argv[1:]
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=int(num_processes), process_id=int(process_id),
                             initialization_timeout=120)
  assert jax.device_count() == 4 * int(num_processes), jax.devices()
  from tests.runs import multiprocess_config  # noqa: E402
  from moe_embed.train import trainer  # noqa: E402
  trainer.train_and_evaluate(multiprocess_config(data_dir), workdir)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

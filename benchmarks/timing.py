"""How the benchmarks measure: wall time of a call, interleaved rounds, the matmul peak,
and the memory of a compiled function.

Every benchmark times through `timed` (one call, to the end of its device work) or
`interleaved` (warm-up, then rounds); each puts this folder on sys.path.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Hashable, Mapping, Optional

import jax
import jax.numpy as jnp


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """(wall seconds, result) of one call of `fn`, until its arrays are ready on the device."""
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return time.perf_counter() - start, result


def interleaved(fns: Mapping[Hashable, Callable[[], Any]], rounds: int,
                after_round: Optional[Callable[[int, dict], None]] = None
                ) -> tuple[dict, dict, dict]:
  """(warm-up seconds, seconds of each round, last result), each keyed like `fns`.

  Each function is called once to warm up (compiles, first allocations), then
  `rounds` times, one call of each in turn per round, so that a change in the
  load of a shared machine hits them alike. `after_round(r, times)` runs after
  round r (0-based) with the times so far: progress lines, or a matmul peak
  measured in the same rounds.
  """
  first, results = {}, {}
  for key, fn in fns.items():
    first[key], results[key] = timed(fn)
  times = {key: [] for key in fns}
  for r in range(rounds):
    for key, fn in fns.items():
      seconds, results[key] = timed(fn)
      times[key].append(seconds)
    if after_round is not None:
      after_round(r, times)
  return first, times, results


def peak_runner(n: int, dtype: str) -> tuple[Callable[[], Any], float]:
  """(a compiled [n, n] @ [n, n] matmul, its FLOPs), for `measure_peak`."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  fn = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  jax.block_until_ready(fn(a, b))
  return (lambda: fn(a, b)), 2.0 * n ** 3


def measure_peak(runners, calls: int = 3) -> float:
  """Best GFLOP/s over the sizes, each the best of `calls` calls (a peak, not a median)."""
  best = 0.0
  for run, flops in runners:
    best = max(best, flops / min(timed(run)[0] for _ in range(calls)) / 1e9)
  return best


def memory_gb(compiled) -> float:
  """Arguments + outputs + temporaries - aliased (donated) bytes, from XLA's analysis."""
  stats = compiled.memory_analysis()
  if stats is None:
    return float("nan")
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return total / 1e9

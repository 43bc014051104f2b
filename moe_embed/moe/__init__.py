"""The Mixture-of-Experts core as pure JAX functions: no Flax modules, no configs.

  routing          top-k router: which experts each token uses, with what weight
  router_stats     additive per-layer statistics and everything derived from them
                   (load-balancing and z-losses, expert usage, entropy)
  experts          dispatch, expert MLPs and combine: the dropless and capacity paths
  grouped_matmul   the grouped matmul kernels of the dropless path
  expert_parallel  experts sharded over mesh axes; tokens exchanged with all_to_all

Imports: jax and numpy only, and within this package in the order listed (acyclic).
`moe_embed.model.moe_mlp` wraps these functions in the Flax layer that holds
the parameters.
"""

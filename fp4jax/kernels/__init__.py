"""Pallas kernels. Each module holds the kernel, its `*_reference` in plain
jnp, a `can_use_*` predicate and an `interpret` flag (STYLE R9); `qdot`
chooses between them outside jit."""

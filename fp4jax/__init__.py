"""fp4jax: FP4 quantized LLaMA training in JAX.

Layers point one way (a module imports only modules to its left):
backend -> fallback -> numerics -> qspec -> recipe_keys -> qconfig -> quant ->
gemm -> kernels (Pallas) -> qdot -> sharding -> sizes / llama -> flops / memory
-> models (families) -> optim / data / checkpoint / metrics -> train_state ->
train -> main. qdot is the one dispatch point that chooses
a kernel (its can_use_* predicate) or its jnp reference, outside jit.
"""

__version__ = "0.1.0"

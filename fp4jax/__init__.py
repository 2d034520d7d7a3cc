"""fp4jax: FP4 quantized LLaMA training in JAX.

Layers point one way (a module imports only modules to its left):
numerics -> qconfig -> quant -> qdot -> kernels -> llama ->
optim / sharding / data / checkpoint -> train -> main.
"""

__version__ = "0.1.0"

"""fp4jax: FP4 quantized LLaMA training in JAX.

Layers point one way (a module imports only modules to its left):
numerics -> qconfig -> quant -> qdot -> sharding -> sizes / llama ->
optim / data / checkpoint / flops / metrics -> train_state -> train -> main.
(A Pallas `kernels` package will sit between qdot's dispatch and llama.)
"""

__version__ = "0.1.0"

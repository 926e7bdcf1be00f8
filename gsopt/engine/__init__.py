"""The engine: the stages as tensor callables, the decoder's caches and steps, speculation,
quantized and CPU kernels, and the pipelines that drive them."""

"""Backend-specific implementations of kunet's layers: the only kunet modules that import torch,
TensorFlow, JAX-specific forms or Triton.

Each module registers its implementations with :mod:`kunet.dispatch`, which imports the active
backend's modules on first use (``dispatch.BACKEND_MODULES``):

- :mod:`kunet.backends.triton`: the fused Triton DoubleConv (CUDA, or ``TRITON_INTERPRET=1``);
- :mod:`kunet.backends.torch_ops`: PyTorch eager ops on channels_last views (DoubleConv, Conv2D,
  Conv2DTranspose, MaxPool2x) and the UNet's inference replay;
- :mod:`kunet.backends.tensorflow_ops`: TensorFlow's fused ops (DoubleConv);
- :mod:`kunet.backends.tensorflow_data`: NumPy arrays as a tf.data pipeline (UNet inputs);
- :mod:`kunet.backends.jax_ops`: the ``keras.ops`` forms XLA:CPU runs faster (DoubleConv,
  Conv2DTranspose, MaxPool2x).

Importing this package imports nothing.
"""

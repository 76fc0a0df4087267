"""Triton kernels of fimlora, installed as ``fimlora._kernels``. Importing this package needs triton."""

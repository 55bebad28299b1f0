"""Shared test setup. keras must use the JAX backend here (TensorFlow is not installed); set it before any import."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

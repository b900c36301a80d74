"""avt_jax: pretraining and fine-tuning audio-visual Transformers for emotion recognition in JAX/Flax."""

__version__ = "0.1.0"

"""featx: cache frozen-backbone image features in HDF5, fit heads on them, compare with fine-tuning."""

__version__ = "0.1.0"

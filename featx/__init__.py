"""featx: cache frozen-backbone image features in HDF5, fit heads on them, compare with fine-tuning.

Python API: ``featx.extract``, ``featx.embed_images``, ``featx.load``, ``featx.to_dataframe`` (``featx.api``).
"""

__version__ = "0.1.0"

from featx.api import embed_images, extract, load, to_dataframe  # noqa: E402  (after __version__: store reads it)

__all__ = ["embed_images", "extract", "load", "to_dataframe", "__version__"]

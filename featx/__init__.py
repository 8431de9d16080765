"""featx: cache frozen-backbone image features in HDF5, fit heads on them, compare with fine-tuning.

Python API: ``featx.extract``, ``featx.embed_images``, ``featx.load``, ``featx.to_dataframe`` (``featx.api``).

The modules, in pipeline order (each imports only modules above it in its group or in earlier groups):

- extract: ``mirror`` (where weights and datasets come from) -> ``sources`` (what to read: ``Split``s) ->
  ``decode`` (files -> uint8 batches) -> ``backbones`` (the model registry) -> ``embed`` (batches -> features;
  ``compiled``, ``memory``) -> ``store`` (the HDF5 format) -> ``shards`` (decode, embed, write one shard) ->
  ``engines`` (local or Ray) -> ``extract`` (the runner: plan, resume, merge);
- heads: ``heads`` (logreg, linear, knn) -> ``metrics`` -> ``fit`` (fit-head, evaluate);
- fine-tuning: ``checkpoints`` -> ``finetune``;
- out: ``predict``, ``export`` (models), ``export_features`` (Parquet, npy, pandas);
- entry points: ``api``, ``flags`` -> ``cli``; shared: ``tensors`` (safe ``torch.load``), ``version``.
"""

from featx.api import embed_images, extract, finetune, load, to_dataframe
from featx.version import __version__

__all__ = ["embed_images", "extract", "finetune", "load", "to_dataframe", "__version__"]

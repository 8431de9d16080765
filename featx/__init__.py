"""featx: cache frozen-backbone image features in HDF5, fit heads on them, compare with fine-tuning.

Python API: ``featx.extract``, ``featx.finetune`` and ``featx.compare`` (the commands, same flags),
``featx.embed_images``, ``featx.load``, ``featx.to_dataframe`` (``featx.api``).

The modules, in pipeline order (each imports only modules above it in its group or in earlier groups):

- ground floor: ``devices`` (which device and autocast dtype), ``tensors`` (safe ``torch.load``), ``cache`` (the
  private cache: compiled packages, ONNX graphs, runtime choices), ``version``;
- extract: ``mirror`` (where weights and datasets come from) -> ``sources`` (what to read: ``Split``s) ->
  ``decode`` (files -> uint8 batches) -> ``backbones`` (the model registry, ``BackboneSpec``) -> ``runtimes``
  (torch or ONNX Runtime; ``auto`` decided) -> ``embed`` (the mapper: batches -> features; ``compiled``,
  ``memory``) -> ``store`` (the HDF5 format) -> ``options`` (``ExtractOptions``) -> ``shards`` (decode, embed,
  write one shard) -> ``engines`` (local or Ray) -> ``extract`` (the runner: plan, resume, merge);
- heads: ``heads`` (logreg, linear, knn, zeroshot) -> ``metrics`` -> ``fit`` (fit-head, evaluate);
- fine-tuning: ``checkpoints`` -> ``finetuning``;
- out: ``predict``, ``export`` (models), ``export_features`` (Parquet, npy, pandas);
- compare: ``leakage`` (near copies) -> ``report`` (tables, figures, report.html) -> ``compare`` (the runner);
- entry points: ``api``, ``flags`` -> ``cli``.
"""

from featx.api import embed_images, extract, finetune, load, to_dataframe
from featx.compare import compare
from featx.version import __version__

__all__ = ["compare", "embed_images", "extract", "finetune", "load", "to_dataframe", "__version__"]

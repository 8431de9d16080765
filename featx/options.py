"""How an extraction runs (``ExtractOptions``), validated up front; below the roles that read it (``shards``,
``engines``, ``extract``)."""

from __future__ import annotations

from dataclasses import dataclass

from featx import store
from featx.decode import READERS
from featx.devices import PRECISIONS, QUANTIZED
from featx.runtimes import check_runtime_name

DTYPES = ("float32", "float16")
COMPRESSIONS = (None, "gzip", "lzf")


@dataclass(frozen=True)
class ExtractOptions:
    """How to run extraction; validated on construction."""

    batch_size: int = 64
    workers: int | None = None  # decode threads or processes; None = one per core
    reader: str = "auto"  # threads (decode, then forward, in turn: no contention) on CPU; processes on CUDA
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 (exact) on CPU; bf16/fp16 on CPUs that have them natively
    runtime: str = "auto"  # torch, onnxruntime, or auto: the faster exact one here (featx.runtimes.resolve_runtime)
    channels_last: bool = True
    compile: bool = False
    fold_batch_norm: bool = True  # BatchNorms folded into the convolutions before them (float32 rounding only)
    forward_batch: int | None = None  # images per model call; None: the whole batch
    decode_on_device: bool | None = None  # JPEGs decoded on the model's device (nvjpeg); None: on with CUDA
    dtype: str = "float32"
    compression: str | None = None
    shard_size: int = 1024  # an unfinished run keeps the shard size it started with
    overwrite: bool = False
    layout: str = "copy"  # copy: one merged file; virtual: the file reads the shards in place (no copy)
    views: int = 1  # augmented views per training image (1 = the eval transform only)
    augment_seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "shard_size", "views", "forward_batch"):
            value = getattr(self, name)
            if not (name == "forward_batch" and value is None) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise ValueError(f"workers must be a non-negative integer, got {self.workers!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.reader not in READERS:
            raise ValueError(f"reader must be one of {READERS}, got {self.reader!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.layout not in store.LAYOUTS:
            raise ValueError(f"layout must be one of {store.LAYOUTS}, got {self.layout!r}")
        check_runtime_name(self.runtime)
        if self.precision not in ("auto", *PRECISIONS, *QUANTIZED):
            raise ValueError(f"precision must be one of auto, {', '.join((*PRECISIONS, *QUANTIZED))}, got "
                             f"{self.precision!r}")
        if self.layout == "virtual" and self.compression:
            raise ValueError("compression applies to the copy layout; the virtual layout reads the shards as written")

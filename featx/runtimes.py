"""Runtimes for the mapper: what runs a backbone's forward pass on normalised float32 batches. ``torch`` is PyTorch
eager (``featx.embed``); ``onnxruntime`` runs the same model exported to ONNX once (CPU). Both are exact: features
within ``EXACT`` of PyTorch float32. ``resolve_runtime`` is the one place ``--runtime`` is checked and ``auto``
decided: on a CPU in float32, the choice remembered for this model and host, else ``fastest_exact`` of the
candidates the mapper builds.

An ONNX graph is data, not code (featx registers no custom operators); it is still kept in featx's private cache
(``featx.cache``) and loaded only when its digest is the one recorded when it was exported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from featx.cache import UntrustedCacheError, cache_dir, cached_file, model_key, require_private

RUNTIMES = ("auto", "torch", "onnxruntime")  # what --runtime takes; an Embedder runs one of the last two
EXACT = {"max_abs": 1e-4, "min_cosine": 0.99999}  # what "the same features" means for a runtime
INT8_MIN_COSINE = 0.99  # --precision int8 is refused where it moves a held-out image's features further than this
INT8_AGREEMENT = "featx.int8_agreement"  # a quantized graph's metadata: its agreement measured when it was built
CLEARLY_FASTER = 1.10  # another runtime replaces torch only when at least this much faster (a tie keeps torch)
ROUNDS = 3  # interleaved timing rounds: a busy moment slows every candidate alike


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the exporter are installed (featx depends on them; a trimmed install may lack them)."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def onnxruntime_version() -> str | None:
    """ONNX Runtime's version, or None when it is not installed."""
    return importlib.metadata.version("onnxruntime") if onnxruntime_available() else None


class OnnxModel:
    """``model`` exported to ONNX (batch size free) and run by ONNX Runtime's CPU provider with ``threads`` threads:
    normalised float32 [B, 3, H, W] (any memory format) -> float32 [B, D]; with ``int8`` (a
    ``featx.embed.Calibration``), that graph quantized on the user's images (``int8_session``)."""

    name = "onnxruntime"

    def __init__(self, model: nn.Module, crop: int, label: str, threads: int, int8=None):
        if not onnxruntime_available():
            raise ValueError("--runtime onnxruntime needs ONNX Runtime: pip install onnx onnxscript onnxruntime")
        import onnxruntime

        example = torch.zeros(1, 3, crop, crop)
        path = cached_file("onnx", f"{label.replace('/', '--')}-{model_key(model, example)[:24]}.onnx",
                           lambda out: _export(model, example, out), f"{label} as ONNX")
        self.options = onnxruntime.SessionOptions()
        self.options.intra_op_num_threads, self.options.inter_op_num_threads = threads, 1
        self.session = onnxruntime.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
        probe = calibration_batch(crop, 2).float().div(255)  # the graph must compute this model, whatever its digest
        with torch.inference_mode():
            expected = model.eval()(probe)
        found = agreement(expected, self(probe))  # relative too: a trained model's large logits round further
        if not found["max_abs"] <= 1e-4 + 1e-3 * float(expected.abs().max()):
            raise UntrustedCacheError(f"refusing the cached {path}: it does not compute {label} (a graph and digest "
                                      "put there by someone else?); delete it (featx rebuilds it)")
        self.int8_agreement = None
        if int8 is not None:
            self.session, self.int8_agreement = int8_session(path, label, self, int8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, x)


def run_session(session, x: torch.Tensor) -> torch.Tensor:
    """An ONNX Runtime session's output for normalised float32 images ``x``."""
    return torch.from_numpy(session.run(None, {"images": x.contiguous().numpy()})[0])


def int8_session(graph, label: str, fp32: OnnxModel, calibration):
    """An ONNX Runtime session of ``graph`` quantized to int8 (static, QDQ, per-channel weights) on one half of
    ``calibration``'s images, and its agreement with ``fp32`` on the other half, measured when it was built. Both are
    cached, keyed by the graph and the images' bytes, so a later run quantizes and measures nothing; it checks the
    graph on two held images only. Refused in one line below ``INT8_MIN_COSINE``, naming the figure."""
    import onnxruntime

    key = f"{Path(graph).stem}{calibration.key()}{onnxruntime_version()}"  # the stem holds the model's key
    path = cached_file("onnx", f"{Path(graph).stem}-int8-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx",
                       lambda out: _quantize(graph, fp32, calibration, out),
                       f"{label} quantized to int8 (calibrated on your images)")
    session = onnxruntime.InferenceSession(str(path), fp32.options, providers=["CPUExecutionProvider"])
    untrusted = UntrustedCacheError(f"refusing the cached {path}: it does not compute {label} quantized (a graph "
                                    "and digest put there by someone else?); delete it (featx rebuilds it)")
    recorded = session.get_modelmeta().custom_metadata_map.get(INT8_AGREEMENT)
    if recorded is None:
        raise untrusted
    measured = json.loads(recorded)
    if measured["min_cosine"] < INT8_MIN_COSINE:  # a refusal writes nothing, whoever wrote the graph
        raise ValueError(f"--precision int8 would change {label}'s features: min cosine {measured['min_cosine']:.4f} "
                         f"to float32 on {measured['held_images']} of your images ({INT8_MIN_COSINE} needed); keep "
                         "--precision fp32")
    held = calibration.images(held=True, limit=2)  # they agreed when it was built: another graph would not
    if agreement(fp32(held), run_session(session, held))["min_cosine"] < INT8_MIN_COSINE:
        raise untrusted
    return session, measured


def _quantize(graph, fp32: OnnxModel, calibration, out) -> None:
    """``graph`` quantized on ``calibration``'s first half into ``out``, with its agreement with ``fp32`` on the
    held half written into the graph's metadata (``INT8_AGREEMENT``)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate, held = calibration.images(held=False), calibration.images(held=True)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": calibrate[i:i + 8].numpy()} for i in range(0, len(calibrate), 8)])

        def get_next(self):
            return next(self.batches, None)

    prepared = Path(out).with_name("prepared.onnx")
    with warnings.catch_warnings(), _silenced():
        warnings.simplefilter("ignore")
        quant_pre_process(str(graph), str(prepared))
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    session = onnxruntime.InferenceSession(str(out), fp32.options, providers=["CPUExecutionProvider"])
    measured = agreement(fp32(held), run_session(session, held))
    quantized = onnx.load(str(out))
    quantized.metadata_props.add(key=INT8_AGREEMENT, value=json.dumps({
        "min_cosine": measured["min_cosine"], "max_abs": measured["max_abs"],
        "calibration_images": len(calibrate), "held_images": len(held)}))
    onnx.save(quantized, str(out))


def check_runtime_name(runtime: str) -> str:
    """``runtime`` if ``--runtime`` takes it, else a one-line ValueError."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    return runtime


def check_runtime(runtime: str, device: torch.device, amp: torch.dtype | None, compile: bool,
                  quantized: bool = False) -> str:
    """A concrete runtime (not ``auto``) that can run as asked (``quantized``: --precision int8), else a one-line
    ValueError."""
    if check_runtime_name(runtime) == "auto":
        raise ValueError("runtime auto is decided by featx.runtimes.resolve_runtime before a model runs")
    if quantized and runtime != "onnxruntime":
        raise ValueError("--precision int8 runs on ONNX Runtime: --runtime onnxruntime or auto")
    if runtime == "onnxruntime" and (device.type != "cpu" or amp is not None or compile):
        raise ValueError("--runtime onnxruntime runs float32 on the CPU: not with --device cuda, --precision bf16/fp16 "
                         "or --compile (use --runtime torch for those)")
    return runtime


def resolve_runtime(runtime: str, device: torch.device, amp: torch.dtype | None, compile: bool,
                    key: Callable[[], str], measure: Callable[[], dict], quantized: bool = False) -> str:
    """The runtime that runs: ``runtime`` checked, or for ``auto`` torch everywhere but a CPU in float32 without
    --compile where ONNX Runtime is installed; there, the choice remembered under ``key()`` (computed only then: it
    hashes the weights) in the private cache, else ``measure()``'s (``fastest_exact`` of the candidates, or torch
    where ONNX Runtime cannot take the model), which is remembered."""
    if runtime != "auto" or quantized:  # int8: ONNX Runtime's quantized graph is the only one
        return check_runtime("onnxruntime" if runtime == "auto" else runtime, device, amp, compile, quantized)
    if device.type != "cpu" or amp is not None or compile or not onnxruntime_available():
        return "torch"
    return remembered(key(), measure)["runtime"]


def describe(runtime: str) -> str:
    """A runtime and its version, for provenance: ``torch 2.14.1``, ``onnxruntime 1.32.0``."""
    if runtime == "onnxruntime":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"


def _export(model: nn.Module, example: torch.Tensor, path) -> None:
    """The TorchScript-based exporter: ~1.5 s for ResNet-18 on 2 cores, against 6-14 s for the dynamo one. Its
    notes are silenced: when it fails it prints the whole graph (hundreds of lines), and the error says enough."""
    with warnings.catch_warnings(), _silenced(), _plain_attention():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)


@contextlib.contextmanager
def _plain_attention():
    """nn.MultiheadAttention's fused fast path (``aten::_native_multi_head_attention``, which ONNX cannot express)
    off while exporting: the same maths in plain ops, so OpenCLIP's and torchvision's ViTs export exactly."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _silenced():
    """Standard output and error, at the descriptor level (the exporter logs from C++), sent nowhere."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for descriptor, copy in zip((1, 2), saved):
            os.dup2(copy, descriptor)
            os.close(copy)


def agreement(reference: torch.Tensor, features: torch.Tensor) -> dict:
    """Max abs difference and min cosine of ``features`` to ``reference`` (rows), and whether that is exact."""
    reference, features = reference.double().flatten(1), features.double().flatten(1)
    if reference.shape != features.shape:  # another model's output
        return {"max_abs": float("inf"), "min_cosine": -1.0, "exact": False}
    max_abs = float((reference - features).abs().max()) if len(reference) else 0.0
    same_zero = (reference.norm(dim=1) == 0) & (features.norm(dim=1) == 0)  # a dead row in both agrees
    cosine = float(torch.where(same_zero, 1.0, nn.functional.cosine_similarity(reference, features, dim=1)).min()) \
        if len(reference) else 1.0
    return {"max_abs": max_abs, "min_cosine": cosine,
            "exact": max_abs <= EXACT["max_abs"] and cosine >= EXACT["min_cosine"]}


def remembered(key: str, measure) -> dict:
    """The choice remembered under ``key`` in the private cache; else ``measure()``'s, remembered (written whole:
    a damaged entry, from a kill mid-write or an edit, is measured again)."""
    folder = cache_dir("runtimes")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_private(folder)
    path = folder / f"{key[:32]}.json"
    if path.is_file():
        require_private(path)
        try:
            choice = json.loads(path.read_text())
            if choice.get("runtime") in RUNTIMES[1:]:
                return choice
        except (ValueError, AttributeError):
            pass
        print(f"featx: note: the remembered runtime choice {path} is damaged; measuring again", file=sys.stderr)
    choice = measure()
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(choice))
    partial.chmod(0o600)
    os.replace(partial, path)
    return choice


def remembered_choices() -> list[dict]:
    """Every runtime choice remembered on this host (``featx backbones --runtimes``), newest first."""
    folder = cache_dir("runtimes")
    choices = []
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []:
        try:
            choices.append({**json.loads(path.read_text()), "file": str(path)})
        except ValueError:
            choices.append({"runtime": "damaged (measured again on next use)", "file": str(path)})
    return choices


def fastest_exact(candidates: dict, reference, batch: torch.Tensor, rounds: int = ROUNDS) -> dict:
    """Which of ``candidates`` (name -> callable on ``batch``) runs, with what was measured: exactness checked once
    against ``reference`` (PyTorch float32, unfolded); speed warm, as the median of ``rounds`` interleaved timings
    each. ``torch`` stays unless an exact other is ``CLEARLY_FASTER`` (without torch: the fastest exact one)."""
    expected = reference(batch)
    measured = {name: agreement(expected, run(batch)) for name, run in candidates.items()}  # also warms each up
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run(batch)
            seconds[name].append(time.perf_counter() - start)
    for name in candidates:
        measured[name]["images_per_second"] = len(batch) / statistics.median(seconds[name])
    rate = {name: m["images_per_second"] for name, m in measured.items()}
    others = [name for name in measured if measured[name]["exact"] and name != "torch"]
    best = max(others, key=rate.get, default="torch")
    if "torch" in candidates and (best == "torch" or rate[best] < CLEARLY_FASTER * rate["torch"]):
        best = "torch"
    return {"runtime": best, "measured": measured, "rounds": rounds, "batch": len(batch)}


def calibration_batch(crop: int, size: int = 16) -> torch.Tensor:
    """A fixed uint8 batch for timing and agreement: smooth random images (not noise, which no photo looks like)."""
    generator = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (size, 3, 8, 8), generator=generator, dtype=torch.uint8).float()
    return nn.functional.interpolate(small, size=(crop, crop), mode="bilinear").round().to(torch.uint8)


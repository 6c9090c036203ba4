"""TensorRT: serialized engines built from the exported ONNX with the TensorRT Python API, and a runner.

``tensorrt`` is imported inside functions only: this module imports (and ``trtexec_command`` works) where
TensorRT is not installed, e.g. the project's CPU machines, where it cannot be installed at all.

Which graph TensorRT takes — the **dense** graph, by default:

* The sparse graph's active-pixel count comes from ``NonZero``, a *data-dependent shape* in TensorRT's terms
  (glossary: "explicitly data-dependent shape - depends on the dimensions of an output of INonZeroLayer").
  TensorRT supports it (onnx-tensorrt ``docs/operators.md``, TensorRT 10.15: NonZero FP32/FP16; ScatterND
  "``reduction`` other than ``none`` is not supported" — which is why the sparse graph gathers, adds and
  scatters with replace), but every NonZero costs a device-to-host size copy and a synchronization inside the
  engine, and engines with data-dependent shapes cannot be captured in CUDA graphs (Torch-TensorRT runtime
  docs: "Not compatible with models that have data-dependent shapes (DDS ops such as nonzero)"; TensorRT-RTX
  1.2 notes: stream capture "is not possible ... when using data-dependent dynamic shapes").
* In the dense graph every shape follows from the input's H and W, so one optimization profile covers it,
  the convolutions get TensorRT's tuned (fp16 tensor-core) tactics, and the engine is CUDA-graph capturable.
  Pixel sparsity rarely turns into GPU time at pixel granularity (SIGE, Li et al. 2022: 1.2 % edited pixels ->
  2-4x, not 7-18x).

So ``m2ae-export --trt`` and ``backend="tensorrt"`` use the dense graph (``execution="auto"`` means dense);
``--sparse`` / ``execution="sparse"`` still build the sparse graph for measurement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import M2AEError
from ..model import M2AENet
from .onnx import DEFAULT_OPSET, GraphSpec, export_onnx
from .runner import GraphExecutor
from ..messages import one_line

# The graphs' dense_above; `auto` runs the dense engine regardless (auto_policy), so only an explicit switch uses it.
TRT_DENSE_ABOVE = 0.45

NOT_INSTALLED = "TensorRT is not installed (its libraries come only from NVIDIA's package index)"


class TensorRTUnavailable(M2AEError, RuntimeError):
    """TensorRT or a CUDA GPU is missing, or the engine could not be built; one-line message."""


def unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (one line), or None when it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return NOT_INSTALLED
    if not torch.cuda.is_available():
        return "TensorRT is installed but no CUDA GPU is visible to torch"
    return None


# Each side of a profile shape at most 8192: the widest feature tensors of the dense graph (~16 values a pixel for
# the default network) then stay under TensorRT's 2**31 elements per tensor, and 8K is twice the default 4K max.
MAX_SIDE = 8192


@dataclass(frozen=True)
class Profile:
    """Optimization profile for the dynamic image size: min / opt / max ``(H, W)``, each side 2..:data:`MAX_SIDE`."""

    min: tuple[int, int] = (32, 32)
    opt: tuple[int, int] = (720, 1280)
    max: tuple[int, int] = (2160, 3840)

    def __post_init__(self) -> None:
        for a, b, what in ((self.min, self.opt, "min <= opt"), (self.opt, self.max, "opt <= max")):
            if not (a[0] <= b[0] and a[1] <= b[1]):
                raise ValueError(f"optimization profile needs {what} in both H and W, got {a} and {b}")
        if min(self.min) < 2:
            raise ValueError(f"the smallest image side is 2 pixels, got min shape {self.min}")
        if max(self.max) > MAX_SIDE:
            raise ValueError(f"the largest image side is {MAX_SIDE} pixels (larger ones exceed TensorRT's "
                             f"2**31 elements a tensor), got max shape {self.max}; run larger images in tiles")

    def shapes(self, input_name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        channels = 3 if input_name == "image" else 1
        return tuple((1, channels, *hw) for hw in (self.min, self.opt, self.max))

    def covers(self, height: int, width: int) -> bool:
        return self.min[0] <= height <= self.max[0] and self.min[1] <= width <= self.max[1]


def trtexec_command(onnx_path: str, engine_path: str, profile: Profile, spec: GraphSpec) -> str:
    """The ``trtexec`` line that builds the same engine as :func:`build_engine`."""
    def dims(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, profile.shapes(name)[which]))}" for name in spec.input_names)

    # fp16 graphs are typed in the ONNX itself (TensorRT 11 has no FP16 builder flag); fp32 engines keep
    # full fp32 (no TF32) so that they meet the 1e-4 agreement of the backends-agree contract (README: Contracts and the tests that hold them).
    precision = "--stronglyTyped" if spec.fp16 else "--noTF32"
    return (f"trtexec --onnx={onnx_path} --saveEngine={engine_path} --minShapes={dims(0)} "
            f"--optShapes={dims(1)} --maxShapes={dims(2)} {precision}")


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_model: bytes, profile: Profile, spec: GraphSpec, fp16_flag: bool = False,
                 workspace_bytes: int | None = None) -> bytes:
    """Parse the ONNX ``onnx_model`` and build a serialized engine (the TensorRT samples' recipe).

    Args:
        onnx_model: serialized ONNX of the graph ``spec`` (fp16 graphs are built strongly typed).
        profile: H/W range of ``image`` (and ``mask``).
        fp16_flag: TensorRT 10 only: let the builder pick fp16 kernels for an fp32 graph (weak typing).
            TensorRT 11 removed the flag; export with ``fp16=True`` instead.
    Raises:
        TensorRTUnavailable: TensorRT missing, a parser error (all of them, one line), or a failed build.
    """
    reason = unavailable_reason()
    if reason:
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    if spec.fp16 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(one_line(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} could not parse the {spec.kind} graph: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16_flag:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no FP16 builder flag (networks are strongly "
                                      "typed); export the graph in fp16 (--fp16) instead")
        config.set_flag(trt.BuilderFlag.FP16)
    elif not spec.fp16 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    shapes = builder.create_optimization_profile()
    for name in spec.input_names:
        shapes.set_shape(name, *profile.shapes(name))
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} failed to build the {spec.kind} engine "
                                  "(see its log above)")
    return bytes(serialized)


class EngineRunner:
    """Runs a serialized engine on torch CUDA tensors: ``runner({"image": t, ...}) -> {name: tensor}``."""

    def __init__(self, engine: bytes, device: torch.device):
        import tensorrt as trt

        self.device = device
        self._logger = _logger()             # TensorRT keeps a raw pointer: the logger must outlive the runtime
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine)
        if self.engine is None:
            raise TensorRTUnavailable("TensorRT could not deserialize the engine (built by another version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self._dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bool: torch.bool,
                        trt.int32: torch.int32, trt.int64: torch.int64, trt.uint8: torch.uint8}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = {}
        for name in self.inputs:
            keep[name] = tensor = feeds[name].to(self.device).contiguous()
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:   # shapes follow from the input shapes: no output allocator needed
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self._dtypes[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        stream.synchronize()
        return outputs


class TrtExecutor(GraphExecutor):
    """TensorRT backend (CUDA only): engines built on first use from the ONNX graphs, cached in memory.

    ``execution="auto"`` runs the dense graph (see the module docstring); ``"sparse"`` the sparse one.
    Images must lie inside ``profile``; building an engine takes seconds to minutes.
    """

    name = "tensorrt"
    auto_policy = "dense"

    def __init__(self, net: M2AENet, *, dense_above: float | None = None, device: str | torch.device = "cuda",
                 fp16: bool = False, opset: int = DEFAULT_OPSET, profile: Profile | None = None):
        reason = unavailable_reason()
        if reason:
            raise TensorRTUnavailable(reason)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"backend 'tensorrt' runs on CUDA devices only, got device {str(device)!r}")
        super().__init__(net, dense_above=TRT_DENSE_ABOVE if dense_above is None else dense_above, fp16=fp16,
                         opset=opset)
        self.profile = profile or Profile()
        self.engines: dict[GraphSpec, bytes] = {}

    def _load(self, spec: GraphSpec) -> EngineRunner:
        self.engines[spec] = build_engine(export_onnx(self.net, spec).SerializeToString(), self.profile, spec)
        return EngineRunner(self.engines[spec], self.device)

    def _run(self, runner: EngineRunner, spec: GraphSpec, image: torch.Tensor,
             mask: torch.Tensor | None) -> list[torch.Tensor]:
        height, width = image.shape[-2:]
        if not self.profile.covers(height, width):
            raise ValueError(f"image {height}x{width} lies outside the engine's profile "
                             f"{self.profile.min} .. {self.profile.max}; build with a wider profile")
        feeds = {"image": image.to(self.device, torch.float32)}
        if spec.mask_input:
            feeds["mask"] = mask.to(self.device, torch.bool)
        outputs = runner(feeds)
        return [outputs[name] for name in spec.output_names]

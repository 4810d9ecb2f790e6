"""The single backend table of our ops (STYLE.md practice 3).

Each op has an ordered list of backends; the first whose `applies(*tensors)` holds wins.
Order: CUDA `_C`, Triton, CPU `_C`, then the torch reference, which always applies.
Falling back to the reference warns once per op and process. `DETAILFLOW_BACKEND`
(torch | cpu | cuda | triton) forces a backend for debugging and side-by-side benchmarks.

Self-check at first use: the first time a process routes an op to a compiled or Triton backend
on a device, that backend runs once on a small fixed input against the op's torch reference
(the op's `selfcheck`, registered beside it, within its tolerance). On an error or a mismatch
it warns once (op, backend, device, what went wrong) and the op takes its next backend on that
device for the rest of the process. `DETAILFLOW_SELFCHECK=0` turns this off. Kernels that have
never run on a given GPU thus cannot silently corrupt images there.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import operator
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
from torch.utils import _python_dispatch

BACKEND_ENV = "DETAILFLOW_BACKEND"
SELFCHECK_ENV = "DETAILFLOW_SELFCHECK"
BACKENDS = ("cuda", "triton", "cpu", "torch")

# Must match csrc/include/dispatch.h DType.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2,
               torch.int64: 3, torch.int32: 4, torch.int8: 5}


def _load_extension():
    try:
        from detailflow_engine import _C  # noqa: WPS433 - optional compiled extension
    except ImportError as exc:  # built without a compiler, or a broken build
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


_C, _C_IMPORT_ERROR = _load_extension()


def extension():
    """The compiled extension module, or None when it is absent."""
    return _C


def build_info() -> dict:
    """What the extension was built with ({} plus the import error when it is absent)."""
    if _C is None:
        return {"cpu": False, "cuda": False, "import_error": _C_IMPORT_ERROR}
    return dict(_C.build_info())


def has_cpu_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "has_cpu", False))


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "has_cuda", False))


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclass(frozen=True)
class Backend:
    name: str
    applies: Callable[..., bool]
    fn: Callable


_TABLE: Dict[str, List[Backend]] = {}
_WARNED: set = set()

# Set by `detailflow_engine.profile` (set_profile_ranges): then pick() hands out backends whose fn
# runs inside a `detailflow::<op>` torch.profiler range, so our kernels show by name in profiles
# even on the plain-eager path that skips the custom op. A plain bool: one check when off.
PROFILE_RANGES = False
_RANGED: Dict[tuple, Backend] = {}


def set_profile_ranges(on: bool) -> None:
    global PROFILE_RANGES
    PROFILE_RANGES = bool(on)


# A profiler range: torch's C++ RecordFunctionFast where it exists (~1 us an enter + exit while a
# profile runs), else torch.profiler.record_function (~11 us, most of it Python that the profile
# would charge to "Python / framework": the observer's own cost, not the engine's).
_FAST_RANGE = getattr(getattr(torch._C, "_profiler", None), "_RecordFunctionFast", None)


def profiler_range(name: str):
    """A context manager: a named torch.profiler range (what `profile` reads the tables from)."""
    return _FAST_RANGE(name) if _FAST_RANGE is not None else torch.profiler.record_function(name)


def _ranged(op: str, b: Backend) -> Backend:
    key = (op, b.name, b.fn)
    r = _RANGED.get(key)
    if r is None:
        label, fn = f"detailflow::{op}", b.fn

        def ranged_fn(*args, **kwargs):
            with profiler_range(label):
                return fn(*args, **kwargs)

        r = _RANGED[key] = Backend(b.name, b.applies, ranged_fn)
    return r


def register(op: str, name: str, fn: Callable, applies: Optional[Callable[..., bool]] = None) -> None:
    """Add a backend for `op`. Call order does not matter: entries are kept in BACKENDS order."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    entries = [b for b in _TABLE.get(op, []) if b.name != name]
    entries.append(Backend(name, applies or (lambda *a, **k: True), fn))
    entries.sort(key=lambda b: BACKENDS.index(b.name))
    _TABLE[op] = entries


# op -> check(backend, reference_fn, device): runs `backend.fn` (same signature as the torch
# entry's `reference_fn`) on small fixed inputs on `device` (those its `applies` accepts) and
# raises when a result is wrong.
_SELFCHECKS: Dict[str, Callable[["Backend", Callable, torch.device], None]] = {}
_CHECKED: Dict[tuple, bool] = {}  # (op, backend, device type, index) -> passed
OP_MODULES = ("decode_gemm", "decode_gemm_w8a8", "cache_attention", "group_sample", "vq_lookup", "code_search",
              "add_rmsnorm", "rope_qkv", "decode_layer", "prior_step")


def register_selfcheck(op: str, check: Callable[["Backend", Callable, torch.device], None]) -> None:
    _SELFCHECKS[op] = check


def expect_close(what: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    """A self-check's comparison: |got - want| <= atol + rtol * max|want| everywhere, finite."""
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = atol + rtol * (want.abs().max().item() if want.numel() else 0.0)
    if not err <= bound:  # NaN fails too
        raise AssertionError(f"{what}: max error {err:.3g} > {bound:.3g}")


def selfcheck_enabled() -> bool:
    return os.environ.get(SELFCHECK_ENV, "1").strip() != "0"


def _device_of(args, kwargs) -> Optional[torch.device]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _passes_selfcheck(op: str, b: Backend, device: Optional[torch.device]) -> bool:
    """Whether backend `b` of `op` may serve `device` (its self-check, run once per process)."""
    if b.name == "torch" or device is None or op not in _SELFCHECKS:
        return True
    key = (op, b.name, device.type, device.index)
    ok = _CHECKED.get(key)
    if ok is None:
        if not selfcheck_enabled():
            return True
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return True  # no check inside a graph capture; from_pretrained checked eagerly before
        reference = next(e.fn for e in _TABLE[op] if e.name == "torch")
        try:
            _SELFCHECKS[op](b, reference, device)
            ok = True
        except Exception as e:  # noqa: BLE001 - any failure of an unproven kernel means: not this one
            ok = False
            warnings.warn(f"detailflow_engine: self-check of {op} on the {b.name} backend failed on {device} "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); {op} uses its next "
                          f"backend on {device} for the rest of this process", RuntimeWarning, stacklevel=4)
        _CHECKED[key] = ok
    return ok


def selfcheck(device: Union[str, torch.device]) -> Dict[str, str]:
    """Run every op's self-check for `device` now (from_pretrained does, so that the first
    generation or a CUDA-graph capture never pays for it) -> {op: backend that will serve it}."""
    for name in OP_MODULES:  # registration happens at import
        importlib.import_module(f"detailflow_engine.ops.{name}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # tensors name their index: key the checks alike
        device = torch.device("cuda", torch.cuda.current_device())
    chosen = {}
    for op, entries in _TABLE.items():
        for b in entries:
            if b.name == "torch" or not _backend_may_serve(op, b.name, device):
                continue
            if _passes_selfcheck(op, b, device):
                chosen[op] = b.name
                break
        else:
            chosen[op] = "torch"
    return chosen


def _backend_may_serve(op: str, name: str, device: torch.device) -> bool:
    """Whether backend `name` is built for `device` at all (what its `applies` tests besides shapes)."""
    if name == "cpu":
        return device.type == "cpu" and has_cpu_kernels()
    if name == "cuda":
        return device.type == "cuda" and has_cuda_kernels()
    if name == "triton":
        return device.type == "cuda" and _triton_available()
    return False


def forced_backend() -> Optional[str]:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {BACKENDS}")
    return value


def pick(op: str, *args, **kwargs) -> Backend:
    """The backend that runs `op` for these arguments."""
    entries = _TABLE.get(op)
    if not entries:
        raise KeyError(f"no backends registered for op {op!r}")
    forced = forced_backend()
    if forced is not None:
        for b in entries:
            if b.name == forced:
                if not b.applies(*args, **kwargs):
                    raise RuntimeError(f"{BACKEND_ENV}={forced} but that backend of {op} does not "
                                       f"apply to these inputs (device/dtype/build)")
                return _ranged(op, b) if PROFILE_RANGES else b
        raise RuntimeError(f"{BACKEND_ENV}={forced} but {op} has no such backend "
                           f"(registered: {[b.name for b in entries]})")
    device = _device_of(args, kwargs) if _SELFCHECKS else None
    for b in entries:
        if b.applies(*args, **kwargs) and _passes_selfcheck(op, b, device):
            if b.name == "torch" and op not in _WARNED:
                _WARNED.add(op)
                why = _C_IMPORT_ERROR or "no compiled backend applies to these inputs"
                warnings.warn(f"detailflow_engine: {op} is falling back to the torch reference ({why})",
                              UserWarning, stacklevel=3)
            return _ranged(op, b) if PROFILE_RANGES else b
    raise RuntimeError(f"no backend of {op} applies")  # unreachable: torch always applies


def table() -> Dict[str, List[str]]:
    """op -> backend names, in priority order (for reports and tests)."""
    return {op: [b.name for b in entries] for op, entries in _TABLE.items()}


def num_threads() -> int:
    """OpenMP threads for CPU kernels follow torch's intra-op setting."""
    return max(1, torch.get_num_threads())


def plain_eager(*tensors) -> bool:
    """True when nobody can observe an op call: not traced by torch.compile, no dispatch mode
    (fake or proxy tensors), plain tensors only (None allowed), no autograd.

    Then a wrapper may call the backend directly instead of its `torch.library` custom op, whose
    Python autograd/ADInplaceOrView layers cost ~17-20 us a call: as much as a whole batch-1 kernel.
    Wrappers of mutating ops then bump the mutated tensors' versions themselves
    (`torch.autograd.graph.increment_version`). Traced calls still see one custom op.
    """
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad)) for t in tensors)


def describe(t: torch.Tensor) -> str:
    """'(8192, 16) float16 on cpu': what an argument check reports as found."""
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


# --- helpers the op wrappers share ---------------------------------------------------------

def tolerance_table(op: str, table: Dict[torch.dtype, tuple]) -> Callable[[torch.dtype], tuple]:
    """An op's `tolerance(dtype) -> (atol, rtol)` from its per-dtype table (kept beside its
    reference, so tests and benchmarks' --check use the same numbers); other dtypes raise."""
    table = dict(table)

    def tolerance(dtype: torch.dtype) -> tuple:
        try:
            return table[dtype]
        except KeyError:
            raise ValueError(f"{op} has no tolerance for {dtype}") from None

    tolerance.__qualname__ = tolerance.__name__ = "tolerance"
    tolerance.__module__ = f"detailflow_engine.ops.{op}"
    return tolerance


def into(out: Optional[torch.Tensor], result: torch.Tensor) -> torch.Tensor:
    """A reference's `out=` convention: result itself, or `out` holding a copy of it."""
    if out is None:
        return result
    out.copy_(result)
    return out


def on_device(device: torch.device):
    """torch.cuda.device(device) when it is not the current CUDA device, else a no-op context:
    a kernel launched for a tensor on cuda:1 must run with cuda:1 current."""
    if device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (its index, or the current one)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count


def has_unit_last(t: torch.Tensor) -> bool:
    """Whether t's last dimension has unit stride (what the kernels index by)."""
    return t.stride(-1) == 1 or t.shape[-1] == 1


def unit_last(t: torch.Tensor) -> torch.Tensor:
    """t when its last dimension has unit stride, else a contiguous copy."""
    return t if has_unit_last(t) else t.contiguous()


def dtype_words(dtypes) -> str:
    """(float32, bfloat16, float16) -> 'float32, bfloat16 or float16', for argument messages."""
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def dtypes_for(t: torch.Tensor, cpu_dtypes: tuple, cuda_dtypes: tuple) -> tuple:
    """(the dtypes an op accepts for a tensor on t's device, their names for messages)."""
    dtypes = cuda_dtypes if t.device.type == "cuda" else cpu_dtypes
    return dtypes, dtype_words(dtypes)


def as_index(name: str, value) -> int:
    """`value` as a Python int (ints and integer-like objects, not bools), else a TypeError naming `name`."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}") from None


@functools.lru_cache(maxsize=None)
def triton_kernels(op: str):
    """detailflow_engine.ops._triton.<op>, or None when triton does not import or there is no
    CUDA device (imported on first use only: importing triton is slow)."""
    if not _triton_available():
        return None
    try:
        return importlib.import_module(f"detailflow_engine.ops._triton.{op}")
    except ImportError:
        return None

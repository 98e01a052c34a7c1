"""The compiled loops of the fused scans (``csrc/scan.cpp``) and of the KVAE's Kalman
filter (``csrc/kalman.cpp``), one extension built at first use.

``fast.FusedScan`` (the VRNN's chain, and the RVAE's through ``fast_rvae``),
``fast_srnn.ZChain`` and ``fast_dkf.CombinerChain`` run their forward and reverse loops in
C++ when this module can provide them, and in Python (the same steps, one torch call per
op) otherwise;
``fast_kvae.KalmanFilter`` runs only compiled (without it, ``KVAE._filter``'s Python loop
runs under plain autograd). The extension is compiled once with
``torch.utils.cpp_extension.load`` (g++ or clang, and ninja) into a cache folder outside
the package, so a read-only install works: ``$VRNN_CACHE/extensions/<name>`` if
``VRNN_CACHE`` is set, else ``~/.cache/vrnn/extensions/<name>``, the name carrying a hash
of the sources, the torch version and the Python version (a change of any of them builds
anew).

Where no compiler is found or the build fails, one line says so (a ``RuntimeWarning``,
once per process) and the Python loops run. ``VRNN_COMPILED=0`` in the environment, or
``set_enabled(False)``, forces the Python loops (tests run both).

The compiled loops run float32 by default; float64 keeps the Python loops, whose values
are bit for bit those of the plain autograd loop and of the no-grad path (for the VRNN,
the SRNN and the DKF; the RVAE's chain through the VRNN's scan agrees with its own loop to
rounding: its loop's cell is ``torch.lstm_cell``/``gru_cell``) (the compiled
loops' exp/tanh/log1p are the C library's, not ATen's vectorised ones, so they agree to
rounding only), a property the library's float64 checks rely on (a filtered prefix equals
the training trace's state, FIVO's gradient pass repeats its gradient-free pass).
``VRNN_COMPILED=all`` or ``set_enabled(True, float64=True)`` runs float64 compiled too
(the tests do, for gradcheck and the comparisons with autograd).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["extension", "loaded", "available", "enabled", "set_enabled", "using", "cache_dir", "SOURCES"]

SOURCES = tuple(Path(__file__).resolve().parent / "csrc" / f for f in ("scan.cpp", "kalman.cpp"))
_ENV = os.environ.get("VRNN_COMPILED", "1").strip().lower()
_state: dict = {"module": None, "tried": False, "error": None,
                "enabled": _ENV not in ("0", "false", "no", "off"), "float64": _ENV == "all"}


def cache_dir() -> Path:
    root = os.environ.get("VRNN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vrnn"
    return base / "extensions"


# Built for the machine that builds it (vectorised exp/tanh: AVX2/AVX-512 where the CPU has
# them), with its matmuls as direct calls into the BLAS inside libtorch_cpu (MKL in the
# x86-64 wheels). Where that fails (no such symbol, or a compiler refusing -march=native),
# the next set is tried: ATen's mm in place of the direct calls, then portable flags.
_BASE = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
FLAGS = (_BASE + ["-march=native", "-DVRNN_BLAS"], _BASE + ["-march=native"], _BASE)


def _cpu() -> str:
    """What the build depends on besides the source: the CPU's features (a cache shared by
    machines of different CPUs keeps one build per kind)."""
    import platform
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _name() -> str:
    h = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES))
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{sys.platform}|{_cpu()}|{FLAGS}".encode())
    return f"vrnn_scan_{h.hexdigest()[:12]}"


def _ninja_on_path() -> None:
    """torch's build calls ``ninja`` from PATH; the ``ninja`` wheel (a dependency) puts it
    in the environment's bin folder, which is not on PATH unless the venv is activated."""
    if shutil.which("ninja"):
        return
    dirs = [str(Path(sys.executable).parent)]
    with contextlib.suppress(Exception):
        import ninja  # the PyPI wheel
        if ninja.BIN_DIR:
            dirs.insert(0, str(ninja.BIN_DIR))
    for d in dirs:
        if (Path(d) / "ninja").is_file():
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _build():
    from torch.utils.cpp_extension import load
    cxx = os.environ.get("CXX", "c++")  # what torch's build calls
    if not shutil.which(cxx):
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    name = _name()
    build = cache_dir() / name
    build.mkdir(parents=True, exist_ok=True)
    if not any(build.glob(f"{name}*.so")) and not any(build.glob(f"{name}*.pyd")):
        print(f"vrnn: compiling the time loops (the scans, the Kalman filter; once, into {build}) ...",
              file=sys.stderr, flush=True)
    _ninja_on_path()
    log = logging.getLogger("torch.utils.cpp_extension")  # its warnings: ours says one line
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        for i, flags in enumerate(FLAGS):
            try:
                mod = load(name=name, sources=[str(s) for s in SOURCES], build_directory=str(build),
                           extra_cflags=flags, verbose=False)
                _state["flags"] = flags
                return mod
            except Exception:
                if i == len(FLAGS) - 1:
                    raise
    finally:
        log.setLevel(level)


def extension():
    """The compiled module, or None (disabled, or the build failed: said once)."""
    if not _state["enabled"]:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = _build()
        except Exception as e:  # no compiler, no ninja, a failed build: the Python loops run
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            _state["error"] = first
            warnings.warn(f"vrnn: the compiled scan is unavailable ({first[:200]}); "
                          "using the Python loops (same results, slower on small models)",
                          RuntimeWarning, stacklevel=3)
    return _state["module"]


def available() -> bool:
    """Whether the compiled loops are built (building them now if not tried yet)."""
    return extension() is not None


def enabled() -> bool:
    return _state["enabled"]


def float64() -> bool:
    """Whether float64 runs the compiled loops too (off by default: see the module docstring)."""
    return _state["float64"]


def set_enabled(on: bool, float64: bool | None = None) -> tuple:
    """Use the compiled loops where they build (True, the default) or the Python loops
    (False); ``float64=True`` extends them to float64 (tests, gradcheck). Returns the
    previous setting, for ``set_enabled(*prev)``."""
    prev = (_state["enabled"], _state["float64"])
    _state["enabled"] = bool(on)
    if float64 is not None:
        _state["float64"] = bool(float64)
    return prev


@contextlib.contextmanager
def using(on: bool, float64: bool | None = None):
    """``with compiled.using(False): ...`` runs the Python loops inside."""
    prev = set_enabled(on, float64)
    try:
        yield
    finally:
        set_enabled(*prev)


def loaded():
    """The compiled module if it was built in this process (whatever ``enabled`` says now):
    a backward pass runs the loops its forward ran."""
    return _state["module"]

"""Peak memory of one measured window (one trial), not of the process's lifetime.

Why this exists: `getrusage(...).ru_maxrss` and torch's peak counters are process-wide
high-water marks. Ray reuses trial processes, so a trial that read them would report the
largest peak of any earlier trial in the same process. `PeakMemory` measures from its own
`start()`:

- CPU: peak resident set size (`peak_rss_mb`). On Linux >= 4.0 the kernel's own mark is
  reset by writing "5" to /proc/self/clear_refs and read back as VmHWM from
  /proc/self/status: exact, and free while the window runs. Where that is not possible (not
  Linux, not permitted, a /proc that ignores the reset) a daemon thread samples
  `psutil.Process().memory_info().rss` every `interval_s` (plus once at start, at every
  read and at stop); that fallback can miss a spike shorter than the interval.
- CUDA: `peak_vram_mb` is torch's allocator peak (`max_memory_allocated`, reset at start);
  `peak_vram_process_mb` is the process's whole device footprint as nvidia-smi shows it
  (CUDA context, kernels and library handles included), estimated as NVML's figure for this
  process now, minus the allocator's reserved memory now, plus the allocator's peak
  reserved memory. Without a per-process NVML figure (no `pynvml`, no permission, another
  PID namespace) that metric is left out: device-wide figures are not this process's.
  No RSS figure is logged on CUDA and no VRAM figure on CPU (never a fake 0).

Both marks are process-wide, so a window measures the whole process: two trials sharing
one process at the same time would see each other's memory (Ray runs one trial per
process). Windows may nest (a trial's own tracker around the one in `hpn.train.train`):
an inner `start()` resets the marks, so it first folds them into every running tracker.

    with PeakMemory(device) as memory:
        ...
        memory.usage()   # {runtime_s, peak_...} so far, e.g. for a trial stopped early
    memory.peaks()       # frozen at exit
"""
from __future__ import annotations

import os
import re
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import psutil
import torch

from hpn import metrics as M

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+; annotations only

#: Writing "5" here resets the process's VmHWM to its current RSS (Linux >= 4.0).
CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")
#: Fallback sampling period: one psutil read took ~30 us on our 2-core CI box, so 100 a
#: second cost about 0.3% of a core.
SAMPLE_INTERVAL_S = 0.01
#: A reset mark must come down to about the current RSS; more than this above it means the
#: kernel (or a /proc emulation) ignored the reset, and the sampler is used instead.
_RESET_SLACK_BYTES = 32 * 2**20
_MIB = 2**20

Method = Literal["auto", "clear_refs", "sampler"]

_lock = threading.Lock()
_active: weakref.WeakSet[PeakMemory] = weakref.WeakSet()


def _read_status() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process in bytes."""
    text = PROC_STATUS.read_text()
    values = {}
    for key in ("VmHWM", "VmRSS"):
        found = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if found is None:
            raise ValueError(f"{key} missing from {PROC_STATUS}")
        values[key] = int(found.group(1)) * 1024
    return values["VmHWM"], values["VmRSS"]


def reset_kernel_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process; False where that cannot be done."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        hwm, rss = _read_status()
    except (OSError, ValueError):
        return False
    return hwm <= rss + _RESET_SLACK_BYTES


class _Sampler:
    """RSS sampled on a daemon thread. Misses spikes shorter than `interval_s`."""

    def __init__(self, interval_s: float) -> None:
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._peak_lock = threading.Lock()
        self.peak = 0
        self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpn-peak-rss", daemon=True)
        self._thread.start()

    def sample(self) -> int:
        rss = self._process.memory_info().rss
        with self._peak_lock:
            self.peak = max(self.peak, rss)
            return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sample()
            except psutil.Error:  # cannot happen for our own process; never crash the thread
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def _nvml_process_used(device: torch.device) -> int | None:
    """Bytes NVML attributes to this process on `device` (nvidia-smi's per-process figure),
    or None where NVML cannot say: no pynvml, no permission, or a PID namespace (a
    container) in which the driver's PIDs are not ours."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()  # reference-counted by NVML; cheap after the first call
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        if not uuid.startswith(("GPU-", "MIG-")):
            uuid = "GPU-" + uuid
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:  # noqa: BLE001 (NVMLError subclasses; AttributeError on old pynvml)
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    for proc in processes:
        used = getattr(proc, "usedGpuMemory", None)
        if proc.pid == os.getpid() and isinstance(used, int) and 0 < used <= total:
            return used
    return None


class PeakMemory:
    """Peak memory of the window from `start()` to `stop()`; see the module docstring.

    `method` (CPU only): "auto" resets the kernel's mark where it can and samples otherwise;
    "clear_refs" insists on the kernel's mark (OSError where it cannot be reset);
    "sampler" forces the sampling thread. After `start()`, `rss_method` says which is used.
    """

    def __init__(self, device: torch.device | str = "cpu", method: Method = "auto",
                 interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.device = torch.device(device)
        self.method = method
        self.interval_s = interval_s
        self.rss_method: str | None = None
        self._started_at: float | None = None
        self._elapsed_s: float | None = None
        self._final: dict[str, float] | None = None
        self._sampler: _Sampler | None = None
        # Marks read just before a nested tracker reset them (bytes).
        self._carried_rss = 0
        self._carried_allocated = 0
        self._carried_reserved = 0

    # -- window -----------------------------------------------------------------------------
    def start(self) -> Self:
        if self._started_at is not None:
            raise RuntimeError("PeakMemory measures one window: start() was already called")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with _lock:
            for other in list(_active):
                other._carry()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                self._start_rss()
            _active.add(self)
        self._started_at = time.perf_counter()
        return self

    def _start_rss(self) -> None:
        if self.method != "sampler" and reset_kernel_peak():
            self.rss_method = "clear_refs"
            return
        if self.method == "clear_refs":
            raise OSError(f"cannot reset the peak-RSS mark through {CLEAR_REFS}")
        self._sampler = _Sampler(self.interval_s)
        # A tracker dropped without stop() (no `with`) still ends its thread when collected.
        weakref.finalize(self, self._sampler.stop)
        self.rss_method = "sampler"

    def _carry(self) -> None:
        """Fold this window's marks so far in before another tracker resets them."""
        if self.rss_method == "clear_refs":
            self._carried_rss = max(self._carried_rss, _read_status()[0])
        if self.device.type == "cuda":
            self._carried_allocated = max(self._carried_allocated,
                                          torch.cuda.max_memory_allocated(self.device))
            self._carried_reserved = max(self._carried_reserved,
                                         torch.cuda.max_memory_reserved(self.device))

    def stop(self) -> dict[str, float]:
        """End the window (idempotent) and return its peaks; the sampler thread always ends."""
        if self._final is None and self._started_at is not None:
            try:
                self._final = self._read()  # the sampler's read takes one last sample
            finally:
                self._elapsed_s = time.perf_counter() - self._started_at
                if self._sampler is not None:
                    self._sampler.stop()
                with _lock:
                    _active.discard(self)
        return self.peaks()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- figures ----------------------------------------------------------------------------
    def peaks(self) -> dict[str, float]:
        """Peak memory in MiB under the metric names: the window's so far, or final once stopped."""
        if self._final is not None:
            return dict(self._final)
        if self._started_at is None:
            raise RuntimeError("PeakMemory.peaks() before start()")
        return self._read()

    def elapsed_s(self) -> float:
        if self._started_at is None:
            raise RuntimeError("PeakMemory.elapsed_s() before start()")
        if self._elapsed_s is not None:
            return self._elapsed_s
        return time.perf_counter() - self._started_at

    def usage(self) -> dict[str, float]:
        """`runtime_s` and the peaks so far: what a trial stopped early still has to log."""
        return {M.RUNTIME_S: self.elapsed_s(), **self.peaks()}

    def _read(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return self._read_cuda()
        if self.rss_method == "clear_refs":
            peak = max(self._carried_rss, _read_status()[0])
        else:
            assert self._sampler is not None
            peak = self._sampler.sample()
        return {M.PEAK_RSS_MB: peak / _MIB}

    def _read_cuda(self) -> dict[str, float]:
        dev = self.device
        out = {M.PEAK_VRAM_MB: max(self._carried_allocated,
                                   torch.cuda.max_memory_allocated(dev)) / _MIB}
        used = _nvml_process_used(dev)
        if used is not None:
            # Outside the allocator (context, kernels, cuBLAS/cuDNN handles), plus its peak.
            overhead = used - torch.cuda.memory_reserved(dev)
            peak_reserved = max(self._carried_reserved, torch.cuda.max_memory_reserved(dev))
            if overhead >= 0:
                out[M.PEAK_VRAM_PROCESS_MB] = (overhead + peak_reserved) / _MIB
        return out


#: Device memory a trial process holds outside torch's allocator: bench/RESULTS.md (GPU
#: section) measured a bare CUDA context at 610 MiB per process on an H100, and 740-760 MiB
#: once a trial has trained (kernels, cuBLAS handles); the cap leaves room for the latter.
CUDA_CONTEXT_MIB = 768
#: The least the allocator keeps when the context alone fills a share. In MiB, not as a
#: fraction of the card: 1% of an H200 is 1,432 MiB, which let a process capped at a quarter
#: of a 6 GB card (1,536 MiB) hold 2,002 MiB (bench/RESULTS.md, H200 run).
MIN_ALLOCATOR_MIB = 64


def cap_cuda_share(fraction: float, device: int | torch.device = 0,
                   context_mib: float = CUDA_CONTEXT_MIB) -> float:
    """Hold this process to `fraction` of the card; returns the allocator's fraction.

    `set_per_process_memory_fraction` caps only torch's allocator, while the CUDA context
    (outside the cap) also lives in the process's share of the card: the allocator gets the
    share minus the context (at least MIN_ALLOCATOR_MIB, at most the share). Without that,
    four trials at 0.25 can over-fill a card by four contexts."""
    total_mib = torch.cuda.get_device_properties(device).total_memory / _MIB
    allocator = min(fraction, max(MIN_ALLOCATOR_MIB, fraction * total_mib - context_mib) / total_mib)
    torch.cuda.set_per_process_memory_fraction(allocator, device)
    return allocator

"""Per-trial peak memory (hpn/memory.py): each window's own peak, never the process's lifetime
high-water mark, which a reused Ray trial process would otherwise carry from trial to trial."""
from __future__ import annotations

import os
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from hpn import memory as mem
from hpn import metrics as M
from hpn.memory import PeakMemory
from hpn.train import prepare_data, train

BIG_MB = 400


def _touch(mb: int) -> np.ndarray:
    """`mb` MiB that are really resident: np.ones writes every page."""
    return np.ones(mb * 2**20, dtype=np.uint8)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.parametrize("method", ["auto", "sampler"])
def test_a_second_window_does_not_inherit_the_first_windows_peak(method):
    with PeakMemory("cpu", method=method) as first:
        big = _touch(BIG_MB)
        time.sleep(0.05)
        del big
    with PeakMemory("cpu", method=method) as second:
        small = _touch(1)
        del small
    # ru_maxrss (the old figure) would give the second window the first one's peak.
    assert second.peaks()[M.PEAK_RSS_MB] < first.peaks()[M.PEAK_RSS_MB] - 300


def test_train_twice_in_one_process_reports_each_runs_own_peak(small_config):
    cfg = small_config.with_updates({"train.epochs": 2})
    data = prepare_data(cfg)

    def allocate_once(epoch: int, row: dict[str, float]) -> None:
        if epoch == 1:
            big = _touch(BIG_MB)
            del big

    first = train(cfg, data, on_epoch=allocate_once).metrics
    second = train(cfg, data).metrics
    assert second[M.PEAK_RSS_MB] <= first[M.PEAK_RSS_MB] - 300
    assert second[M.PEAK_RSS_MB] > 0


def test_the_sampler_fallback_catches_a_short_400mb_spike(monkeypatch, tmp_path):
    # No writable clear_refs (as on a non-Linux or locked-down /proc): "auto" must sample.
    monkeypatch.setattr(mem, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    before = _rss_mb()
    with PeakMemory("cpu") as tracker:
        assert tracker.rss_method == "sampler"
        big = _touch(BIG_MB)
        time.sleep(0.2)
        del big
        time.sleep(0.05)  # freed before the window ends: only the thread's samples saw it
    assert tracker.peaks()[M.PEAK_RSS_MB] >= before + 350
    assert not tracker._sampler.running


def test_the_sampler_thread_stops_when_the_window_ends_in_systemexit():
    def threads() -> int:
        return sum(t.name == "hpn-peak-rss" for t in threading.enumerate())

    before = threads()
    tracker = PeakMemory("cpu", method="sampler")
    with pytest.raises(SystemExit), tracker:  # what Ray raises in a report to stop a trial
        assert threads() == before + 1
        raise SystemExit(0)
    assert threads() == before
    assert tracker.peaks()[M.PEAK_RSS_MB] > 0


def test_the_kernel_mark_is_used_where_it_can_be_reset():
    if not mem.reset_kernel_peak():
        pytest.skip("this kernel or /proc does not reset VmHWM through clear_refs")
    with PeakMemory("cpu") as tracker:
        assert tracker.rss_method == "clear_refs"
        big = _touch(BIG_MB)
        del big
    assert tracker.peaks()[M.PEAK_RSS_MB] >= BIG_MB


@pytest.mark.parametrize("method", ["auto", "sampler"])
def test_a_nested_window_keeps_the_outer_windows_peak(method):
    # A Ray trial's own tracker around the one inside hpn.train.train: the inner start()
    # resets the kernel's mark, which must not erase what the outer window saw before.
    with PeakMemory("cpu", method=method) as outer:
        big = _touch(BIG_MB)
        time.sleep(0.05)
        del big
        with PeakMemory("cpu", method=method) as inner:
            pass
        usage = outer.usage()
    assert usage[M.PEAK_RSS_MB] >= inner.peaks()[M.PEAK_RSS_MB] + 300
    assert usage[M.RUNTIME_S] > 0


def test_on_cpu_only_peak_rss_is_reported(small_config):
    with PeakMemory("cpu") as tracker:
        pass
    assert set(tracker.peaks()) == {M.PEAK_RSS_MB}
    metrics = train(small_config.with_updates({"train.epochs": 1})).metrics
    assert metrics[M.PEAK_RSS_MB] > 0
    assert not {M.PEAK_VRAM_MB, M.PEAK_VRAM_PROCESS_MB} & set(metrics)


def _fake_cuda(monkeypatch, reserved_mib: int, peak_reserved_mib: int, peak_alloc_mib: int) -> None:
    mib = 2**20
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: peak_alloc_mib * mib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved",
                        lambda device=None: peak_reserved_mib * mib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved_mib * mib)


def test_cuda_footprint_is_nvml_usage_minus_reserved_plus_peak_reserved(monkeypatch):
    _fake_cuda(monkeypatch, reserved_mib=100, peak_reserved_mib=300, peak_alloc_mib=250)
    monkeypatch.setattr(mem, "_nvml_process_used", lambda device: 710 * 2**20)
    with PeakMemory("cuda") as tracker:
        pass
    # 610 MiB outside the allocator (710 used now - 100 reserved now) + 300 peak reserved.
    assert tracker.peaks() == {M.PEAK_VRAM_MB: 250.0, M.PEAK_VRAM_PROCESS_MB: 910.0}


def test_cuda_without_a_per_process_nvml_figure_logs_no_footprint(monkeypatch):
    _fake_cuda(monkeypatch, reserved_mib=100, peak_reserved_mib=300, peak_alloc_mib=250)
    monkeypatch.setattr(mem, "_nvml_process_used", lambda device: None)
    with PeakMemory("cuda") as tracker:
        pass
    assert tracker.peaks() == {M.PEAK_VRAM_MB: 250.0}


def test_nvml_usage_is_this_processs_own_entry(monkeypatch):
    Proc = types.SimpleNamespace
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: uuid,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: [
            Proc(pid=os.getpid() + 1, usedGpuMemory=5 * 2**30),
            Proc(pid=os.getpid(), usedGpuMemory=700 * 2**20)],
    )
    props = types.SimpleNamespace(uuid="abc", total_memory=80 * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert mem._nvml_process_used(torch.device("cuda", 0)) == 700 * 2**20
    # In another PID namespace (a container) the driver's PIDs are not ours: no figure.
    fake.nvmlDeviceGetComputeRunningProcesses = lambda handle: [Proc(pid=1, usedGpuMemory=2**30)]
    assert mem._nvml_process_used(torch.device("cuda", 0)) is None


def test_a_trials_cuda_cap_leaves_room_for_the_context(monkeypatch):
    from tuning import ray_tune

    capped: list[float] = []
    monkeypatch.setattr(ray_tune.ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=6144 * 2**20))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: capped.append(fraction))
    assert ray_tune._trial_device(0.25, "auto") == "cuda"
    # a quarter of a 6 GiB card, minus the trained context measured on the H100 (768 MiB)
    assert capped[-1] == pytest.approx(0.25 - 768 / 6144) == pytest.approx(0.125)
    # A share smaller than the context keeps a small floor, never more than the share.
    assert ray_tune._trial_device(0.05, "auto") == "cuda"
    assert capped[-1] == pytest.approx(mem.MIN_ALLOCATOR_MIB / 6144)
    assert ray_tune._trial_device(1.0, "auto") == "cuda"  # the whole card: no cap
    assert len(capped) == 2
    assert ray_tune._trial_device(0.25, "cpu") == "cpu"

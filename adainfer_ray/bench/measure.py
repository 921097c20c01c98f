"""Measuring tools: peak memory of a pass, the machine's matmul rate, the machine itself, the
timed rounds in alternating order, and the FLOPs each setting executed."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from adainfer_ray.bench.settings import BenchmarkConfig
from adainfer_ray.flops import ModelDims, head_flops, layer_flops

class PeakMemory:
    """Peak memory of one pass, in bytes above the level at its start (see DEFINITIONS).

    CPU on Linux: the kernel's own high-water mark (VmHWM), reset before the pass by writing 5 to
    /proc/self/clear_refs: exact, and no thread competing for the GIL. Elsewhere a thread samples
    the RSS every `interval` seconds."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak = 0

    @staticmethod
    def rss() -> int:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:  # Linux without psutil
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._high = max(self._high, self.rss())

    def __enter__(self):
        gc.collect()
        self._thread = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self._base = self._high = self.rss()
        self.method = "VmHWM" if self._status_kb("VmHWM") is not None and self._reset_hwm() else "sampled"
        if self.method == "sampled":
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return False
        if self._thread is not None:
            self._high = max(self._high, self.rss())
            self._stop.set()
            self._thread.join()
        else:
            self._high = max(self._status_kb("VmHWM") or 0, self.rss())
        self.peak = max(0, self._high - self._base)
        return False


def _malloc_trim():
    """Hand freed heap back to the OS, so that RSS before a pass is not inflated by the last one."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sync(device: torch.device):
    """Wait for queued CUDA work, so that a timer reads the work done (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, n: int, reps: int = 3) -> float:
    """FLOP/s of an n x n matmul: 2 n^3 / t, the best of `reps` timed runs after one warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def machine_info(device: torch.device, threads: int) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "threads": threads, "cpu_count": os.cpu_count()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def default_threads() -> int:
    """What the job gives one CPU actor on a node to itself: every core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@dataclass
class Timings:
    seconds: dict
    cpu_seconds: dict
    peaks: dict
    outputs: dict
    carried_batches: dict
    matmul_rates: list
    load_before: list | None
    load_after: list | None


def time_rounds(runners: dict, items: list, cfg: BenchmarkConfig, device: torch.device, mm_n: int, log) -> Timings:
    """Warm every setting up, then time R rounds in alternating order (forward, reverse, ...)."""
    settings = list(runners)
    warm = items[: max(1, min(cfg.warmup, len(items)))]
    for s in settings:  # first kernels, allocator growth, lazy imports
        runners[s].classify(warm)
    matmul_rate(device, mm_n, reps=1)
    sync(device)
    t = Timings({s: [] for s in settings}, {s: [] for s in settings}, {s: [] for s in settings}, {}, {}, [],
                _loadavg(), None)
    for r in range(cfg.rounds):
        t.matmul_rates.append(matmul_rate(device, mm_n))
        for s in settings if r % 2 == 0 else settings[::-1]:
            with PeakMemory(device) as mem:
                sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                out = runners[s].classify(items)
                sync(device)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            t.seconds[s].append(dt)
            t.cpu_seconds[s].append(dc)
            t.peaks[s].append(mem.peak)
            if s not in t.outputs:
                t.outputs[s] = out
                t.carried_batches[s] = getattr(runners[s], "batches", None)
            elif not (out["label"] == t.outputs[s]["label"]).all():
                log(f"warning: {s} gave different labels in round {r + 1}")
            log(f"round {r + 1}/{cfg.rounds} {s:<22} {len(items) / dt:8.2f} items/s  peak +{mem.peak / 2**20:7.1f} MB")
    t.load_after = _loadavg()
    return t


def executed_flops(s: str, out: dict, runner, dims: ModelDims, P: int, item_lens: np.ndarray, C: int) -> tuple:
    """(executed, useful, reference) FLOPs of one pass of setting `s` (see DEFINITIONS)."""
    L = dims.layers
    if s.startswith("hf_"):
        if s == "hf_prefix_cached":
            layers = L * np.array([layer_flops(dims, n, P) for n in item_lens])
        else:
            layers = L * np.array([layer_flops(dims, P + n) for n in item_lens])
        head_rows = P + item_lens if s == "hf_forward" else 1
        executed = float((layers + head_rows * head_flops(dims, dims.vocab)).sum())
        useful = float((layers + head_flops(dims, C)).sum())
        return executed, useful, useful
    used, ref = float(out["flops_used"].sum()), float(out["flops_full_reuse"].sum())
    batches = getattr(runner, "batches", None)
    if not batches:
        return used, used, ref
    # Fixed batches: exited items ride along until their batch's last item exits.
    exit_layer = out["exit_layer"]
    per_layer = np.array([layer_flops(dims, n, P) if runner.reuse_prefix else layer_flops(dims, P + n)
                          for n in item_lens])
    carried = sum(float(per_layer[b].sum()) * int(exit_layer[b].max()) - float((per_layer[b] * exit_layer[b]).sum())
                  for b in map(np.array, batches))
    return used + carried, used, ref

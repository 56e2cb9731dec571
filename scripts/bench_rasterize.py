"""Benchmark the rasterizer: forward and forward+backward time and peak memory, printed as JSON.

Scenes are random Gaussian clouds in front of one camera (sizes chosen so that 20k Gaussians give
~45 overlapping layers per pixel). On CPU this times the pure-PyTorch path; with `--device cuda` it
times gsplat on the GPU and reports its speed-up over the PyTorch path on this machine's CPU and the
largest pixel difference between the two images (parity).
The target for the PyTorch path is >= 10 forward+backward it/s at 160x120 with 20k Gaussians.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import statistics
import threading
import time
from typing import Literal, Optional, Tuple

import torch
import tyro

from difix3d.rendering.rasterize import rasterization, rasterization_torch
from difix3d.runtime import configure_cpu_runtime


@dataclasses.dataclass
class Args:
    device: Literal["cpu", "cuda"] = "cpu"
    """cpu times the PyTorch path; cuda times gsplat and compares it with the PyTorch path on CPU."""
    quick: bool = False
    """Only 160x120 with 5k and 20k Gaussians, fewer repeats (for `make bench`)."""
    threads: Optional[int] = None
    """torch CPU threads (default: torch's choice)."""
    repeats: int = 5
    """Timed repeats per configuration (the median is reported); one warm-up run precedes them."""


def make_scene(n_gaussians: int, width: int, height: int, device: str, seed: int = 0):
    """A random cloud in a box 2..6 units in front of a pinhole camera (60 degree horizontal FOV)."""
    gen = torch.Generator().manual_seed(seed)
    depth = 2.0 + 4.0 * torch.rand(n_gaussians, generator=gen)
    half_width = math.tan(math.radians(30)) * depth
    half_height = half_width * height / width
    means = torch.stack([
        (torch.rand(n_gaussians, generator=gen) * 2 - 1) * half_width * 1.1,
        (torch.rand(n_gaussians, generator=gen) * 2 - 1) * half_height * 1.1,
        depth,
    ], dim=-1)
    scales = 0.01 * torch.exp(torch.randn(n_gaussians, 3, generator=gen) * 0.5) * math.sqrt(20_000 / n_gaussians) * 2.4
    focal = 0.5 * width / math.tan(math.radians(30))
    scene = dict(
        means=means,
        quats=torch.randn(n_gaussians, 4, generator=gen),
        scales=scales,
        opacities=torch.rand(n_gaussians, generator=gen) * 0.9 + 0.05,
        colors=torch.rand(n_gaussians, 3, generator=gen),
        viewmats=torch.eye(4)[None],
        Ks=torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]])[None],
    )
    return {k: v.to(device) for k, v in scene.items()}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakHeap:
    """Peak growth of the bytes malloc has handed out while the block runs (sampled every ms).

    Counts allocated bytes (glibc mallinfo2), not resident memory: the rasterizer keeps freed blocks
    in the heap, so resident memory stops growing after the first call.
    """

    def __enter__(self):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self._mallinfo = libc.mallinfo2
        self.baseline = self.peak = self._in_use()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _in_use(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._in_use())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.baseline) / 2**20


def time_config(render, scene, width, height, device, repeats) -> Tuple[dict, dict]:
    """Median seconds (and peak memory) of a forward pass and of a forward+backward pass."""
    params = {k: v.clone().requires_grad_(k in ("means", "quats", "scales", "opacities", "colors"))
              for k, v in scene.items()}

    def forward():
        with torch.no_grad():
            return render(**params, width=width, height=height, packed=False)

    def forward_backward():
        colors, alphas, info = render(**params, width=width, height=height, packed=False, absgrad=True)
        info["means2d"].retain_grad()
        (colors.sum() + alphas.sum()).backward()
        return colors

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = {}
    for name, step in (("forward", forward), ("forward_backward", forward_backward)):
        step()
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, cpu_times = [], []
        with PeakHeap() as heap:
            for _ in range(repeats):
                start, cpu_start = time.perf_counter(), time.process_time()
                step()
                sync()
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        seconds = statistics.median(times)
        memory = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else heap.mib
        # Process CPU time (all threads) shows how much a busy shared machine inflated wall time.
        results[name] = {"seconds": round(seconds, 5), "it_per_s": round(1 / seconds, 2),
                         "cpu_seconds": round(statistics.median(cpu_times), 5),
                         "peak_memory_mib": round(memory, 1)}
    return results


def layers_per_pixel(scene, width, height) -> float:
    """Mean number of 3-sigma ellipses covering a pixel: the Gaussian-pixel overlaps per pixel."""
    with torch.no_grad():
        _, _, info = rasterization_torch(**{k: v.cpu() for k, v in scene.items()}, width=width, height=height,
                                         packed=False)
    a, b, c = info["conics"][info["radii"] > 0].double().unbind(-1)
    ellipse_areas = math.pi * 9.0 / torch.sqrt(a * c - b * b)
    return round(float(ellipse_areas.sum()) / (width * height), 1)


def scaling_exponent(counts, seconds) -> float:
    """Least-squares slope of log(time) against log(number of Gaussians)."""
    xs, ys = [math.log(c) for c in counts], [math.log(s) for s in seconds]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def main(args: Args) -> None:
    configure_cpu_runtime(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    resolutions = [(160, 120)] if args.quick else [(160, 120), (320, 240)]
    counts = [5_000, 20_000] if args.quick else [5_000, 20_000, 100_000]
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    report = {"device": args.device, "torch_threads": torch.get_num_threads(), "configs": [], "scaling": {}}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for width, height in resolutions:
        for mode in ("forward", "forward_backward"):
            report["scaling"].setdefault(f"{width}x{height}", {})[mode] = []
        for n in counts:
            scene = make_scene(n, width, height, args.device)
            entry = {"width": width, "height": height, "n_gaussians": n,
                     "layers_per_pixel": layers_per_pixel(scene, width, height)}
            if args.device == "cuda":
                entry["gsplat_cuda"] = time_config(rasterization, scene, width, height, "cuda", repeats)
                cpu_scene = {k: v.cpu() for k, v in scene.items()}
                entry["pytorch_cpu"] = time_config(rasterization_torch, cpu_scene, width, height, "cpu", repeats)
                with torch.no_grad():  # parity: the same scene through both paths
                    gsplat_image = rasterization(**scene, width=width, height=height, packed=False)[0].cpu()
                    pytorch_image = rasterization_torch(**cpu_scene, width=width, height=height, packed=False)[0]
                entry["max_abs_difference_gsplat_vs_pytorch"] = float((gsplat_image - pytorch_image).abs().max())
                entry["speedup_gsplat_over_pytorch"] = {
                    mode: round(entry["pytorch_cpu"][mode]["seconds"] / entry["gsplat_cuda"][mode]["seconds"], 1)
                    for mode in ("forward", "forward_backward")
                }
                timed = entry["pytorch_cpu"]
            else:
                timed = entry["pytorch_cpu"] = time_config(rasterization_torch, scene, width, height, "cpu", repeats)
            for mode in ("forward", "forward_backward"):
                report["scaling"][f"{width}x{height}"][mode].append(timed[mode]["seconds"])
            report["configs"].append(entry)
    for resolution, modes in report["scaling"].items():
        report["scaling"][resolution] = {
            f"{mode}_exponent_in_n_gaussians": scaling_exponent(counts, seconds) for mode, seconds in modes.items()
        }
    target = next(c for c in report["configs"] if (c["width"], c["n_gaussians"]) == (160, 20_000))
    report["target"] = {
        "what": "pytorch forward+backward it/s at 160x120, 20k Gaussians",
        "goal": 10.0,
        "measured": target["pytorch_cpu"]["forward_backward"]["it_per_s"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))

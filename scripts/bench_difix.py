"""Latency and peak memory of Difix inference, ours vs a naive path; prints JSON.

Ours: prompt encoded once (a buffer), only the target view decoded. Naive (what the reference
release does per call): re-encode the prompt with the CLIP text encoder, decode every view.
Random weights (`Difix.from_config`), which time the same as trained ones. The text encoder of
the naive path is built from config too (SD 2.1's for sd-turbo, a tiny CLIP for tiny) and fed
fixed token ids (tokenizing a two-word prompt costs microseconds).

    python scripts/bench_difix.py --device cpu              # tiny + sd-turbo at 256x256
    python scripts/bench_difix.py --device cuda             # sd-turbo at 576x1024 and 1080x1920
"""

from __future__ import annotations

import json
import platform
import statistics
import threading
import time
from dataclasses import dataclass

import psutil
import torch
import tyro
from transformers import CLIPTextConfig, CLIPTextModel

from difix3d.model import Difix

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# SD 2.1's text encoder (OpenCLIP ViT-H/14 text tower, penultimate layer) and a tiny stand-in.
_TEXT_ENCODERS = {
    "sd-turbo": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                     hidden_act="gelu", projection_dim=512, vocab_size=49408),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=1000,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1),
}
# Targets from the issue: sd-turbo on an H100, bfloat16, one reference.
_CUDA_TARGETS_MS = {(576, 1024): 35.0, (1080, 1920): 150.0}


@dataclass
class Args:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    models: tuple[str, ...] = ("tiny", "sd-turbo")
    skip_sd_turbo: bool = False  # CPU only: leave out the 1B-parameter model
    sizes: tuple[str, ...] = ()  # "HxW"; default 256x256 on CPU, 576x1024 and 1080x1920 on CUDA
    dtypes: tuple[str, ...] = ()  # default float32 on CPU, bfloat16 and float16 on CUDA
    refs: tuple[int, ...] = (0, 1)
    warmup: int = 1
    repeats: int = 3
    threads: int = 0  # CPU threads; 0: torch's default
    naive: bool = True


class _PeakMemory:
    """Peak memory during a block: exact allocator peak on CUDA, sampled RSS growth on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._process = psutil.Process()
            self._base = self._process.memory_info().rss
            self._peak = self._base
            self._running = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self._peak = max(self._peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._running = False
            self._thread.join()
            self.peak_mb = (self._peak - self._base) / 2**20


def _naive_fix(difix: Difix, text_encoder: CLIPTextModel, token_ids: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Views [B,V,3,H,W] in [-1,1] -> target, re-encoding the prompt and decoding every view."""
    batch, num_views = views.shape[:2]
    difix.prompt_embeds.copy_(text_encoder(token_ids)[0])
    latents, skips = difix.encode(views.flatten(0, 1))
    decoded = difix.decode(difix.denoise(latents, num_views), skips).clamp(-1, 1)
    return decoded.unflatten(0, (batch, num_views))[:, 0]


def _time(function, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median milliseconds, peak memory MiB) of `function()`."""
    for _ in range(warmup):
        function()
    times = []
    with _PeakMemory(device) as memory:
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            function()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), memory.peak_mb


def _bench_model(name: str, args: Args, device: torch.device) -> list[dict]:
    sizes = args.sizes or (("256x256",) if device.type == "cpu" else ("576x1024", "1080x1920"))
    dtypes = args.dtypes or (("float32",) if device.type == "cpu" else ("bfloat16", "float16"))
    difix = Difix.from_config(name).eval().to(device)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_ENCODERS[name], max_position_embeddings=77)).eval().to(device)
    token_ids = torch.randint(0, text_encoder.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for dtype_name in dtypes:
        dtype = _DTYPES[dtype_name]
        difix.to(dtype=dtype)
        text_encoder.to(dtype=dtype)
        for size in sizes:
            height, width = (int(v) for v in size.lower().split("x"))
            if height % 8 or width % 8:
                raise SystemExit(f"bench sizes must be multiples of 8 (the naive path does not pad), got {size}")
            for num_refs in args.refs:
                views = torch.rand(1, 1 + num_refs, 3, height, width, device=device)
                image, refs = views[:, 0], (views[:, 1:] if num_refs else None)
                with torch.inference_mode():
                    ours_ms, ours_mb = _time(lambda: difix.fix(image, refs), device, args.warmup, args.repeats)
                    row = dict(model=name, dtype=dtype_name, height=height, width=width, refs=num_refs,
                               ours_ms=round(ours_ms, 2), ours_peak_mb=round(ours_mb, 1))
                    if args.naive:
                        scaled = (views * 2 - 1).to(dtype)
                        naive_ms, naive_mb = _time(
                            lambda: _naive_fix(difix, text_encoder, token_ids, scaled), device, args.warmup, args.repeats
                        )
                        row.update(naive_ms=round(naive_ms, 2), naive_peak_mb=round(naive_mb, 1),
                                   naive_over_ours=round(naive_ms / ours_ms, 3))
                target = _CUDA_TARGETS_MS.get((height, width))
                if device.type == "cuda" and name == "sd-turbo" and dtype_name == "bfloat16" and num_refs == 1 and target:
                    row.update(target_ms=target, meets_target=ours_ms <= target)
                rows.append(row)
                print(json.dumps(row), flush=True)
    del difix, text_encoder
    return rows


def main(args: Args) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models if not (m == "sd-turbo" and args.skip_sd_turbo)]
    results = [row for name in models for row in _bench_model(name, args, device)]
    report = dict(
        benchmark="difix",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        weights="random (timing only)",
        memory="CUDA: allocator peak above the model; CPU: sampled RSS growth",
        results=results,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))

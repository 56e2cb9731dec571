"""Latency and peak memory of Difix inference, ours vs a naive path; prints JSON.

Ours: prompt encoded once (a buffer), only the target view decoded. Naive (what the reference
release does per call): re-encode the prompt with the CLIP text encoder, decode every view.
Random weights (`Difix.from_config`), which time the same as trained ones. The text encoder of
the naive path is built from config too (SD 2.1's for sd-turbo, a tiny CLIP for tiny) and fed
fixed token ids (tokenizing a two-word prompt costs microseconds).

    python scripts/bench_difix.py --device cpu              # tiny at 256x256, sd-turbo at 128x128
    python scripts/bench_difix.py --device cuda             # sd-turbo at 576x1024 and 1080x1920
    python scripts/bench_difix.py --device cuda --models sd-turbo --compile False True   # eager, then torch.compile

One JSON line per configuration as soon as it is measured (so a run cut short keeps what it has),
then the whole report. Eager configurations run before compiled ones, then dtypes, reference
counts and sizes in the order given (put the most wanted first).
"""

from __future__ import annotations

import functools
import itertools
import json
import statistics
import threading
import time
from dataclasses import dataclass

import psutil
import torch
import tyro
from transformers import CLIPTextConfig, CLIPTextModel

from difix3d.devices import DTYPES, device_name
from difix3d.models.difix import Difix
from difix3d.runtime import configure_cpu_runtime

# SD 2.1's text encoder (OpenCLIP ViT-H/14 text tower, penultimate layer) and a tiny stand-in.
_TEXT_ENCODERS = {
    "sd-turbo": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                     hidden_act="gelu", projection_dim=512, vocab_size=49408),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=1000,
                 bos_token_id=0, eos_token_id=1, pad_token_id=1),
}
# (on CUDA, model) -> sizes; CPU sizes keep `--device cpu` to a few minutes on a small machine.
_DEFAULT_SIZES = {
    (False, "tiny"): ("256x256",),
    (False, "sd-turbo"): ("128x128",),
    (True, "tiny"): ("576x1024",),
    (True, "sd-turbo"): ("576x1024", "1080x1920"),
}
# Targets from the issue: sd-turbo on an H100, bfloat16, one reference.
_CUDA_TARGETS_MS = {(576, 1024): 35.0, (1080, 1920): 150.0}


@dataclass
class Args:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    models: tuple[str, ...] = ("tiny", "sd-turbo")
    skip_sd_turbo: bool = False  # CPU only: leave out the 1B-parameter model
    sizes: tuple[str, ...] = ()  # "HxW"; default per model and device (_DEFAULT_SIZES)
    dtypes: tuple[str, ...] = ()  # default float32 on CPU, bfloat16 and float16 on CUDA
    refs: tuple[int, ...] = (0, 1)
    warmup: int = 1
    repeats: int = 3
    threads: int = 0  # CPU threads; 0: torch's default
    naive: bool = True
    compile: tuple[bool, ...] = (False,)  # True: torch.compile the model (static shapes; each shape compiles once)


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


def _measure(functions: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (median milliseconds, peak memory MiB) of each `function()`. The functions run in
    turn, repeat after repeat, so a busy machine slows all of them alike."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    peaks = dict.fromkeys(functions, 0.0)
    for _ in range(repeats):
        for name, function in functions.items():
            with _PeakMemory(device) as memory:
                start = time.perf_counter()
                function()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - start) * 1000)
            peaks[name] = max(peaks[name], memory.peak_mb)
    return {name: (statistics.median(times[name]), peaks[name]) for name in functions}


def _bench_model(name: str, args: Args, device: torch.device) -> list[dict]:
    sizes = args.sizes or _DEFAULT_SIZES[device.type == "cuda", name]
    dtypes = args.dtypes or (("float32",) if device.type == "cpu" else ("bfloat16", "float16"))
    with device:  # random initialisation on the device: seconds instead of a minute for sd-turbo on a CPU
        difix = Difix.from_config(name).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**_TEXT_ENCODERS[name], max_position_embeddings=77)).eval()
    token_ids = torch.randint(0, text_encoder.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(0)).to(device)
    rows, is_compiled = [], False
    # Eager configurations first: compiling is done in place (`Module.compile`) and cannot be undone.
    for compiled, dtype_name, num_refs, size in itertools.product(sorted(args.compile), dtypes, args.refs, sizes):
        dtype = DTYPES[dtype_name]
        difix.to(dtype=dtype)
        text_encoder.to(dtype=dtype)
        if compiled and not is_compiled:
            difix.compile(dynamic=False)
            is_compiled = True
        height, width = (int(v) for v in size.lower().split("x"))
        if height % 8 or width % 8:
            raise SystemExit(f"bench sizes must be multiples of 8 (the naive path does not pad), got {size}")
        views = torch.rand(1, 1 + num_refs, 3, height, width, device=device)
        image, refs = views[:, 0], (views[:, 1:] if num_refs else None)
        scaled = (views * 2 - 1).to(dtype)
        functions = {"ours": functools.partial(difix.fix, image, refs)}
        if args.naive and not compiled:
            functions["naive"] = functools.partial(_naive_fix, difix, text_encoder, token_ids, scaled)
        row = dict(model=name, dtype=dtype_name, height=height, width=width, refs=num_refs, compiled=compiled)
        with torch.inference_mode():
            if compiled:  # the first call of a new shape compiles it
                started = time.perf_counter()
                difix.fix(image, refs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["compile_seconds"] = round(time.perf_counter() - started, 1)
            measured = _measure(functions, device, args.warmup, args.repeats)
        ours_ms = measured["ours"][0]
        for path, (milliseconds, peak_mb) in measured.items():
            row.update({f"{path}_ms": round(milliseconds, 2), f"{path}_peak_mb": round(peak_mb, 1)})
        if "naive" in measured:
            row["naive_over_ours"] = round(measured["naive"][0] / ours_ms, 3)
        target = _CUDA_TARGETS_MS.get((height, width))
        if device.type == "cuda" and name == "sd-turbo" and dtype_name == "bfloat16" and num_refs == 1 and target:
            row.update(target_ms=target, meets_target=ours_ms <= target)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del difix, text_encoder
    return rows


def main(args: Args) -> None:
    device = torch.device(args.device)
    configure_cpu_runtime(args.threads)
    models = [m for m in args.models if not (m == "sd-turbo" and args.skip_sd_turbo)]
    results = [row for name in models for row in _bench_model(name, args, device)]
    report = dict(
        benchmark="difix",
        device=device_name(device),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        weights="random (timing only)",
        memory="CUDA: allocator peak above the model; CPU: sampled RSS growth",
        results=results,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(tyro.cli(Args))

"""GPU memory of one trial: AMP on/off, peak VRAM, the per-trial cap, trials per 6 GB card.

    PYTHONPATH=. python3 bench/gpu_memory.py [--encoder PATH] [--size 10000] [--json out.json]
    PYTHONPATH=. python3 bench/gpu_memory.py --dry-run        # CPU, tiny sizes: a syntax/flow check

Every case runs `hpn.train.train` in a fresh Python process, so each has its own CUDA context,
its own peak statistics and (for the capped cases) its own
`torch.cuda.set_per_process_memory_fraction`, as a Ray trial would. The parent process never
touches CUDA, so the device-level "used" reading before a case starts is the baseline it adds to.

Per case it records:
  peak_vram_mb   torch.cuda.max_memory_allocated (what train() reports as peak_vram_mb)
  reserved_mb    torch.cuda.max_memory_reserved (the caching allocator's high-water mark; what the
                 per-process fraction caps)
  overhead_mb    the process's device memory outside the allocator after training: CUDA
                 context, loaded kernels, library handles (device used after - before - reserved)
  footprint_mb   overhead_mb + reserved_mb: what the process holds on the card at its peak
The "context" case is a bare process (torch.zeros(1) on the GPU): the smallest CUDA context.

Trials per 6 GB card (6 GiB = 6144 MiB):
  by_peak        floor(6144 / (bare context + peak_vram_mb))            (optimistic)
  by_footprint   floor(6144 / footprint_mb)                             (what nvidia-smi would add up)
The CUDA context depends on the GPU and driver; it is measured here on the bench machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CARD_GIB = 6.0  # the card we plan for
TRIAL_SHARE = 0.25  # tuning's default gpu fraction per trial (DESIGN.md, "Tuning")
MIB = 2**20
DEFAULT_CARRY = Path(".gpu_carry/minilm")


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------
def cases(dry: bool) -> list[dict]:
    head_epochs = "train.epochs=1" if dry else "train.epochs=20"
    ft = ["encoder.trainable_layers=2", "train.batch_size=64",
          "train.epochs=1" if dry else "train.epochs=3",
          "train.max_steps=2" if dry else "train.max_steps=50"]
    # Deliberately too big for a quarter of a 6 GB card: all 6 layers, 2048 texts a batch.
    stress = ["encoder.trainable_layers=6", "train.batch_size=2048", "train.amp=false",
              "train.epochs=1", "train.max_steps=2" if not dry else "train.max_steps=1"]
    if dry:
        stress[1] = "train.batch_size=256"
    out = [
        dict(name="context (bare CUDA init)", kind="context"),
        dict(name="fp16 checkpoint dtype check", kind="dtype_check"),
        dict(name="encode corpus once (frozen)", kind="encode"),
        dict(name="head default, AMP", kind="train", overrides=[head_epochs, "train.amp=true"]),
        dict(name="head default, fp32", kind="train", overrides=[head_epochs, "train.amp=false"]),
        dict(name="head d=512 k=4, AMP", kind="train", overrides=[
            head_epochs, "train.amp=true", "model.prototype_dim=512", "model.prototypes_per_class=4"]),
        dict(name="head d=512 k=4, fp32", kind="train", overrides=[
            head_epochs, "train.amp=false", "model.prototype_dim=512", "model.prototypes_per_class=4"]),
        dict(name="fine-tune top 2, AMP", kind="train", overrides=[*ft, "train.amp=true"]),
        dict(name="fine-tune top 2, fp32", kind="train", overrides=[*ft, "train.amp=false"]),
        dict(name="head default, AMP, capped", kind="train", cap=True,
             overrides=[head_epochs, "train.amp=true"]),
        dict(name="fine-tune top 2, AMP, capped", kind="train", cap=True,
             overrides=[*ft, "train.amp=true"]),
        dict(name="fine-tune top 2, fp32, capped", kind="train", cap=True,
             overrides=[*ft, "train.amp=false"]),
        dict(name="stress: all 6 layers bs 2048 fp32", kind="train", overrides=stress),
        dict(name="stress: all 6 layers bs 2048 fp32, capped", kind="train", cap=True,
             overrides=stress),
    ]
    if dry:
        keep = ("encode corpus once (frozen)", "head default, AMP", "head d=512 k=4, fp32",
                "fine-tune top 2, AMP, capped", "stress: all 6 layers bs 2048 fp32, capped")
        out = [c for c in out if c["name"] in keep]
        for c in out:
            c["name"] = c["name"].replace("2048", "256")
    return out


# --------------------------------------------------------------------------------------------
# worker side (one case, one fresh process)
# --------------------------------------------------------------------------------------------
def device_used_bytes() -> int | None:
    """Device-wide used memory without creating a CUDA context (NVML, else nvidia-smi)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    try:
        text = subprocess.run(
            ["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True).stdout
        return int(float(text.strip().splitlines()[0]) * MIB)
    except Exception:
        return None


def own_process_bytes() -> int | None:
    """This process's device memory as the driver reports it (nvidia-smi's per-process column)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    return None


def _cuda_snapshot(before: int | None) -> dict:
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    reserved_now = torch.cuda.memory_reserved()
    out = {"total_mb": total / MIB, "reserved_now_mb": reserved_now / MIB}
    used_now = total - free
    own = own_process_bytes()
    if own is not None:
        out["process_nvml_mb"] = own / MIB
    process = own if own is not None else (used_now - before if before is not None else None)
    if process is not None:
        out["process_mb"] = process / MIB
        out["overhead_mb"] = (process - reserved_now) / MIB
    return out


def run_context() -> dict:
    import torch

    before = device_used_bytes()
    torch.zeros(1, device="cuda")
    out = _cuda_snapshot(before)
    out["device_name"] = torch.cuda.get_device_name(0)
    out["torch"] = torch.__version__
    out["cuda"] = torch.version.cuda
    out["lazy_loading"] = os.environ.get("CUDA_MODULE_LOADING", "(torch default: LAZY)")
    return out


def run_dtype_check(encoder: str) -> dict:
    """What a half-precision checkpoint does: raw AutoModel vs hpn's TextEncoder, + GradScaler."""
    import torch
    from transformers import AutoModel

    from hpn.encode import TextEncoder

    raw = AutoModel.from_pretrained(encoder)
    out = {"raw_automodel_dtype": str(next(raw.parameters()).dtype)}
    out["textencoder_dtype"] = str(next(TextEncoder(encoder).model.parameters()).dtype)

    # One GradScaler step on the raw (unfixed) load, as train() does with train.amp=true.
    raw = raw.cuda()
    for p in raw.parameters():
        p.requires_grad_(False)
    for p in raw.encoder.layer[-1].parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD([p for p in raw.parameters() if p.requires_grad], lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    ids = torch.randint(1000, 2000, (4, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = raw(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float().pow(2).mean()
    scaler.scale(loss).backward()
    try:
        scaler.step(opt)
        scaler.update()
        out["raw_gradscaler_step"] = "ok"
    except Exception as exc:  # the bug the fix in hpn/encode.py removes
        out["raw_gradscaler_step"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return out


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [f"encoder.name={args.encoder}", f"encoder.cache_dir={args.cache_dir}",
            f"data.size={args.size}", f"train.device={args.device}"]


def run_encode(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from hpn.config import load_config
    from hpn.data import synthetic_corpus
    from hpn.encode import TextEncoder
    from hpn.train import prepare_data

    cfg = load_config(None, base_overrides(args))
    corpus = synthetic_corpus(cfg.data.size, cfg.data.seed, cfg.data.noise)
    before = device_used_bytes() if args.device == "cuda" else None
    t0 = time.perf_counter()
    data = prepare_data(cfg)  # encodes once and writes the embedding cache the cases read
    out = {"encode_s": time.perf_counter() - t0, "texts": len(corpus.texts),
           "classes": corpus.num_classes, "features_shape": list(data.features.shape)}
    tok = TextEncoder(args.encoder).tokenizer
    lengths = [len(ids) for ids in tok(corpus.texts, truncation=True, max_length=128)["input_ids"]]
    out["tokens_median"] = float(np.median(lengths))
    out["tokens_max"] = int(max(lengths))
    if args.device == "cuda":
        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / MIB
        out.update(_cuda_snapshot(before))
    return out


def run_train(args: argparse.Namespace, case: dict) -> dict:
    import torch

    from hpn import metrics as M
    from hpn.config import load_config
    from hpn.train import prepare_data, train

    out: dict = {}
    before = None
    if args.device == "cuda":
        before = device_used_bytes()
        if case.get("cap"):
            total = torch.cuda.get_device_properties(0).total_memory
            fraction = TRIAL_SHARE * CARD_GIB * 2**30 / total
            torch.cuda.set_per_process_memory_fraction(fraction)
            out["cap_fraction"] = fraction
            out["cap_mb"] = fraction * total / MIB
    elif case.get("cap"):
        out["cap_mb"] = None  # no cap on CPU (dry run)
    cfg = load_config(None, [*base_overrides(args), *case["overrides"]])
    data = prepare_data(cfg)  # frozen: from the cache the encode case wrote; fine-tune: texts only
    try:
        result = train(cfg, data)
        out["status"] = "ok"
        m = result.metrics
        for key in (M.PEAK_VRAM_MB, M.PEAK_RSS_MB, M.RUNTIME_S, M.TRAIN_SAMPLES_PER_S, M.TEST_ACCURACY):
            if key in m:
                out[key] = float(m[key])
    except torch.OutOfMemoryError as exc:
        out["status"] = "OutOfMemoryError"
        out["error"] = str(exc).splitlines()[0][:160]
        if args.device == "cuda":
            out[M.PEAK_VRAM_MB] = torch.cuda.max_memory_allocated() / MIB
    if args.device == "cuda":
        out["reserved_mb"] = torch.cuda.max_memory_reserved() / MIB
        out.update(_cuda_snapshot(before))
        if "overhead_mb" in out:
            out["footprint_mb"] = out["overhead_mb"] + out["reserved_mb"]
    return out


def worker(args: argparse.Namespace) -> None:
    case = json.loads(args.worker)
    kind = case["kind"]
    if kind == "context":
        out = run_context()
    elif kind == "dtype_check":
        out = run_dtype_check(args.encoder)
    elif kind == "encode":
        out = run_encode(args)
    else:
        out = run_train(args, case)
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------
def cuda_available_without_context() -> bool:
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # no context in the parent
    import torch

    return torch.cuda.is_available()


def run_case(args: argparse.Namespace, case: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case),
           "--encoder", args.encoder, "--size", str(args.size), "--cache-dir", args.cache_dir,
           "--device", args.device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout,
                          check=False)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": f"crashed rc={proc.returncode}", "error": " | ".join(tail)[:300],
                "process_wall_s": wall}
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_s"] = wall
    out["returncode"] = proc.returncode
    return out


def fmt(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(results: list[tuple[dict, dict]], context_mb: float | None, cuda: bool) -> str:
    card_mb = CARD_GIB * 1024
    mem = "peak_vram_mb" if cuda else "peak_rss_mb"
    rows = [
        (f"| case | status | {mem} | reserved MB | overhead MB | footprint MB | runtime s "
         "| train samples/s | test acc | trials/6 GB by peak | trials/6 GB by footprint |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, r in results:
        if case["kind"] != "train":
            continue
        peak = r.get(mem)
        by_peak = (math.floor(card_mb / (context_mb + peak))
                   if cuda and context_mb is not None and peak is not None and r["status"] == "ok" else None)
        foot = r.get("footprint_mb")
        by_foot = math.floor(card_mb / foot) if foot and r["status"] == "ok" else None
        status = r["status"]
        if r.get("cap_mb"):
            status += f" (cap {r['cap_mb']:.0f} MB)"
        rows.append(
            f"| {case['name']} | {status} | {fmt(peak, 1)} | {fmt(r.get('reserved_mb'))} "
            f"| {fmt(r.get('overhead_mb'))} | {fmt(foot)} | {fmt(r.get('runtime_s'), 1)} "
            f"| {fmt(r.get('train_samples_per_s'))} | {fmt(r.get('test_accuracy'), 3)} "
            f"| {fmt(by_peak)} | {fmt(by_foot)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default=None,
                        help="encoder path or id (default: .gpu_carry/minilm if present, else the bundled MiniLM)")
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the flow only")
    parser.add_argument("--json", default=None, help="also write every case's record here")
    parser.add_argument("--case-timeout", type=int, default=240)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.encoder is None:
        args.encoder = str(DEFAULT_CARRY) if (DEFAULT_CARRY / "config.json").is_file() else "all-MiniLM-L6-v2"
    if args.worker is not None:
        worker(args)
        return

    if args.dry_run:
        args.device, args.size = "cpu", min(args.size, 1000)
    elif not cuda_available_without_context():
        sys.exit("bench/gpu_memory.py measures GPU memory and needs a CUDA device; none is visible. "
                 "Use --dry-run for a quick CPU check of the script itself.")
    tmp = tempfile.TemporaryDirectory(prefix="hpn_gpu_bench_")
    args.cache_dir = args.cache_dir or tmp.name

    results: list[tuple[dict, dict]] = []
    for case in cases(args.dry_run):
        r = run_case(args, case)
        results.append((case, r))
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
        print(f"[{case['name']}] {json.dumps(brief)}", flush=True)

    by_kind = {c["kind"]: r for c, r in results}
    ctx = by_kind.get("context", {})
    context_mb = ctx.get("overhead_mb")
    cuda = args.device == "cuda"
    print()
    if cuda:
        print(f"device: {ctx.get('device_name')} ({fmt(ctx.get('total_mb'))} MiB), torch {ctx.get('torch')}, "
              f"CUDA {ctx.get('cuda')}")
        print(f"bare CUDA context: {fmt(context_mb)} MiB (process seen by NVML: "
              f"{fmt(ctx.get('process_nvml_mb'))} MiB)")
    enc = by_kind.get("encode", {})
    print(f"encoder: {args.encoder}; corpus: {enc.get('texts')} texts, {enc.get('classes')} classes, "
          f"median {enc.get('tokens_median')} / max {enc.get('tokens_max')} tokens; "
          f"encoded once in {fmt(enc.get('encode_s'), 1)} s"
          + (f", peak {fmt(enc.get('peak_vram_mb'))} MiB" if cuda else ""))
    if "dtype_check" in by_kind:
        d = by_kind["dtype_check"]
        print(f"fp16 checkpoint: AutoModel loads {d.get('raw_automodel_dtype')}, TextEncoder "
              f"{d.get('textencoder_dtype')}; GradScaler step on the raw load: {d.get('raw_gradscaler_step')}")
    print()
    print(table(results, context_mb, cuda))
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"case": c, "result": r} for c, r in results], indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()

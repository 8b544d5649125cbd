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
  peak_vram_process_mb  what the trial itself logs (hpn.memory.PeakMemory): NVML's figure for
                 the process - reserved + peak reserved; it should match footprint_mb
The "context" case is a bare process (torch.zeros(1) on the GPU): the smallest CUDA context.
"Capped" cases hold the process to a quarter of a 6 GB card with `hpn.memory.cap_cuda_share`,
the call a Ray trial makes (the allocator gets the share minus the CUDA context). The
concurrent case runs four capped processes at once, as Ray runs 4 trials x 0.25 GPU (Ray
itself only sets CUDA_VISIBLE_DEVICES), and samples the card's used memory from the parent.

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
    head_epochs = "train.epochs=1" if dry else "train.epochs=10"
    ft = ["encoder.trainable_layers=2", "train.batch_size=64",
          "train.epochs=1" if dry else "train.epochs=3",
          "train.max_steps=2" if dry else "train.max_steps=50"]
    # The seed preset (learned prototypes, 200 with 186 extra negatives: the scatter_reduce
    # class scores under autocast) on the default corpus, so the embedding cache is shared.
    seed = ["data.seed=0", "data.val_fraction=0.1", "model.prototype_count=200",
            "model.prototype_dim=256", head_epochs]
    # Deliberately too big for a quarter of a 6 GB card: all 6 layers, 2048 texts a batch.
    stress = ["encoder.trainable_layers=6", "train.batch_size=2048", "train.amp=false",
              "train.epochs=1", "train.max_steps=2" if not dry else "train.max_steps=1"]
    if dry:
        stress[1] = "train.batch_size=256"
    out = [
        dict(name="context (bare CUDA init)", kind="context"),
        dict(name="encode corpus once (frozen)", kind="encode"),
        dict(name="head default, AMP", kind="train", overrides=[head_epochs, "train.amp=true"]),
        dict(name="head default, fp32", kind="train", overrides=[head_epochs, "train.amp=false"]),
        dict(name="seed preset 200 protos d=256, AMP", kind="train", config="seed",
             overrides=[*seed, "train.amp=true"]),
        dict(name="seed preset 200 protos d=256, fp32", kind="train", config="seed",
             overrides=[*seed, "train.amp=false"]),
        dict(name="fine-tune top 2, AMP", kind="train", overrides=[*ft, "train.amp=true"]),
        dict(name="head default, AMP, capped", kind="train", cap=True,
             overrides=[head_epochs, "train.amp=true"]),
        dict(name="fine-tune top 2, AMP, capped", kind="train", cap=True,
             overrides=[*ft, "train.amp=true"]),
        dict(name="stress: all 6 layers bs 2048 fp32, capped", kind="train", cap=True,
             overrides=stress),
        # What Ray does with 4 trials at gpu=0.25: four processes on one card at once (Ray
        # only sets CUDA_VISIBLE_DEVICES; the cap is ours), each capped like a trial.
        dict(name="4 concurrent seed-preset trials, AMP, capped", kind="train", cap=True,
             concurrent=4, config="seed", overrides=[*seed, "train.amp=true"]),
    ]
    if dry:
        keep = ("encode corpus once (frozen)", "head default, AMP", "seed preset 200 protos d=256, AMP",
                "fine-tune top 2, AMP, capped", "stress: all 6 layers bs 2048 fp32, capped",
                "4 concurrent seed-preset trials, AMP, capped")
        out = [c for c in out if c["name"] in keep]
        for c in out:
            c["name"] = c["name"].replace("2048", "256").replace("4 concurrent", "2 concurrent")
            if c.get("concurrent"):
                c["concurrent"] = 2
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
            from hpn.memory import cap_cuda_share

            # A trial's share of a 6 GB card, capped by the code a Ray trial runs.
            total = torch.cuda.get_device_properties(0).total_memory
            share = TRIAL_SHARE * CARD_GIB * 2**30 / total
            out["cap_fraction"] = cap_cuda_share(share, 0)
            out["share_mb"] = share * total / MIB
            out["cap_mb"] = out["cap_fraction"] * total / MIB
    elif case.get("cap"):
        out["cap_mb"] = None  # no cap on CPU (dry run)
    cfg = load_config(case.get("config"), [*base_overrides(args), *case["overrides"]])
    data = prepare_data(cfg)  # frozen: from the cache the encode case wrote; fine-tune: texts only
    try:
        result = train(cfg, data)
        out["status"] = "ok"
        m = result.metrics
        for key in (M.PEAK_VRAM_MB, M.PEAK_VRAM_PROCESS_MB, M.PEAK_RSS_MB, M.RUNTIME_S, M.TRAIN_SAMPLES_PER_S, M.TEST_ACCURACY):
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


def _worker_cmd(args: argparse.Namespace, case: dict) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case),
            "--encoder", args.encoder, "--size", str(args.size), "--cache-dir", args.cache_dir,
            "--device", args.device]


def _parse(proc_rc: int, stdout: str, stderr: str, wall: float) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc_rc != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"status": f"crashed rc={proc_rc}", "error": " | ".join(tail)[:300],
                "process_wall_s": wall}
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_s"] = wall
    out["returncode"] = proc_rc
    return out


def run_case(args: argparse.Namespace, case: dict) -> dict:
    if case.get("concurrent"):
        return run_concurrent(args, case)
    t0 = time.perf_counter()
    proc = subprocess.run(_worker_cmd(args, case), capture_output=True, text=True,
                          timeout=args.case_timeout, check=False)
    return _parse(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def run_concurrent(args: argparse.Namespace, case: dict) -> dict:
    """`concurrent` workers at once on one card, as Ray runs fractional trials; the parent
    samples the device's used memory (NVML, no CUDA context of its own) every 20 ms."""
    n = int(case["concurrent"])
    before = device_used_bytes() if args.device == "cuda" else None
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_worker_cmd(args, case), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(n)]
    peak_used = before
    while any(p.poll() is None for p in procs) and time.perf_counter() - t0 < args.case_timeout:
        if before is not None:
            used = device_used_bytes()
            if used is not None:
                peak_used = max(peak_used or 0, used)
        time.sleep(0.02)
    workers = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, args.case_timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        workers.append(_parse(p.returncode, stdout, stderr, time.perf_counter() - t0))
    out: dict = {"status": "ok" if all(w["status"] == "ok" for w in workers)
                 else "; ".join(sorted({w["status"] for w in workers})),
                 "workers": workers, "concurrent": n}
    for key in ("peak_vram_mb", "peak_vram_process_mb", "reserved_mb", "overhead_mb",
                "footprint_mb", "runtime_s", "train_samples_per_s", "test_accuracy",
                "share_mb", "cap_mb", "peak_rss_mb"):
        values = [w[key] for w in workers if isinstance(w.get(key), (int, float))]
        if values:
            out[key] = max(values)
    if before is not None and peak_used is not None:
        out["device_peak_above_baseline_mb"] = (peak_used - before) / MIB
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
        (f"| case | status | {mem} | reserved MB | overhead MB | footprint MB "
         "| logged peak_vram_process_mb | runtime s "
         "| train samples/s | test acc | trials/6 GB by peak | trials/6 GB by footprint |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            status += f" (share {r.get('share_mb', 0):.0f} MB, allocator cap {r['cap_mb']:.0f} MB)"
        if r.get("concurrent"):
            status += f", max of {r['concurrent']} at once"
        rows.append(
            f"| {case['name']} | {status} | {fmt(peak, 1)} | {fmt(r.get('reserved_mb'))} "
            f"| {fmt(r.get('overhead_mb'))} | {fmt(foot)} | {fmt(r.get('peak_vram_process_mb'))} "
            f"| {fmt(r.get('runtime_s'), 1)} "
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
    parser.add_argument("--only", default=None,
                        help="run only the cases whose name contains this text (plus context and encode)")
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
        if args.only and case["kind"] == "train" and args.only not in case["name"]:
            continue
        r = run_case(args, case)
        results.append((case, r))
        brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k != "workers"}
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
    print()
    print(table(results, context_mb, cuda))
    for case, r in results:
        if r.get("concurrent"):
            foots = [w.get("footprint_mb") for w in r["workers"] if w.get("footprint_mb")]
            print(f"\n{case['name']}: {r['status']}; device peak above baseline "
                  f"{fmt(r.get('device_peak_above_baseline_mb'))} MiB (sampled every 20 ms), "
                  f"footprints {', '.join(fmt(f) for f in foots) or '–'} MiB "
                  f"(sum {fmt(sum(foots)) if foots else '–'}) against a "
                  f"{CARD_GIB * 1024:,.0f} MiB card")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"case": c, "result": r} for c, r in results], indent=2))
    tmp.cleanup()


if __name__ == "__main__":
    main()

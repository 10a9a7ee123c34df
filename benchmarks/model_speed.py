"""FSG-Net forward speed and peak memory: SDPA vs explicit attention, fp32 vs bf16 autocast, per tile size.

Every configuration runs in a fresh subprocess so that peak memory is its own: on CPU the peak resident set
(``VmHWM`` from ``/proc/self/status``) minus the resident set just before the first forward; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the first forward.

    python benchmarks/model_speed.py                 # tiles 256 and 512, fp32 and bf16, CPU (+ CUDA if present)
    python benchmarks/model_speed.py --quick         # tile 256 only, fewer repeats
    python benchmarks/model_speed.py --backward      # time a training step (forward + backward) instead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def run_one(cfg: dict) -> dict:
    """Measure one configuration in this process and return the figures."""
    import torch

    sys.path.insert(0, str(REPO))
    from cdmap.models import FSGNet, ModelConfig

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    model = FSGNet(ModelConfig(backbone=cfg["backbone"], attention=cfg["attention"])).to(device)
    with torch.no_grad():
        for block in model.stsam:
            block.cross.gamma.fill_(0.5)  # a trained model's attention is on; the value does not change the cost
    model.train(cfg["backward"])
    model.set_dropblock_prob(0.0)
    b, t = cfg["batch"], cfg["tile"]
    a = torch.rand(b, 3, t, t, device=device)
    bb = torch.rand(b, 3, t, t, device=device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["dtype"]]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if cfg["backward"]:
                out = model(a, bb)
                out.float().mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    model(a, bb)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _proc_status_kib("VmRSS") * 1024
    for _ in range(cfg["warmup"]):
        step()
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _proc_status_kib("VmHWM") * 1024 - base
    return {**cfg, "times_s": times, "peak_mib": peak / 2**20, "threads_used": torch.get_num_threads(),
            "torch": torch.__version__}


def _aggregate(runs: list[dict]) -> dict:
    """Merge the rounds of one configuration: best and median over all timed repeats, largest peak."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    times = sorted(t for r in ok for t in r["times_s"])
    best, median = times[0], times[len(times) // 2]
    b, tile = ok[0]["batch"], ok[0]["tile"]
    return {
        **{k: v for k, v in ok[0].items() if k != "times_s"},
        "times_s": times,
        "best_s": best,
        "median_s": median,
        "pairs_per_s": b / best,
        "mpix_per_s": b * tile * tile / best / 1e6,
        "peak_mib": max(r["peak_mib"] for r in ok),
    }


def _spawn(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    env = dict(os.environ)
    if cfg["threads"]:
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**cfg, "error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**cfg, "error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cuda_available() -> bool:
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    return out.stdout.strip() == "True"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, nargs="+", default=[256, 512])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--attention", nargs="+", default=["sdpa", "explicit"], choices=["sdpa", "explicit"])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--backward", action="store_true", help="time forward+backward in train mode")
    p.add_argument("--quick", action="store_true", help="tile 256 only, 1 warmup, 2 repeats")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sweep (configurations interleaved) and keep the best; "
                        "use >1 on a shared machine")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return 0
    if args.quick:
        args.tiles, args.warmup, args.repeats = [256], 1, 2
    devices = args.devices or (["cpu", "cuda"] if _cuda_available() else ["cpu"])

    print(f"# load average before: {_load()}  (os.cpu_count()={os.cpu_count()})")
    configs = []
    for device in devices:
        for tile in args.tiles:
            for dtype in args.dtypes:
                if device == "cpu" and dtype == "fp16":
                    continue
                for attention in args.attention:
                    configs.append(dict(
                        device=device, tile=tile, dtype=dtype, attention=attention, backbone=args.backbone,
                        batch=args.batch_size, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                        backward=args.backward,
                    ))
    runs: list[list[dict]] = [[] for _ in configs]
    for round_no in range(args.rounds):
        for cfg, cfg_runs in zip(configs, runs, strict=True):
            r = _spawn(cfg, args.timeout)
            cfg_runs.append(r)
            label = f"  round {round_no + 1}: {cfg['device']} {cfg['tile']} {cfg['dtype']} {cfg['attention']}"
            if "error" in r:
                print(f"{label}: ERROR {r['error']}", file=sys.stderr)
            else:
                ms = " ".join(f"{t * 1e3:.0f}" for t in r["times_s"])
                print(f"{label}: ms {ms}, peak +{r['peak_mib']:.0f} MiB, load {_load()}", file=sys.stderr)
    results = [_aggregate(cfg_runs) for cfg_runs in runs]
    print(f"# load average after: {_load()}")
    mode = "forward+backward (train)" if args.backward else "forward (inference_mode)"
    print(f"# FSG-Net {args.backbone}, batch {args.batch_size}, {mode}; {args.rounds} round(s) x {args.repeats} "
          f"timed runs after {args.warmup} warm-up, each configuration in a fresh process; pairs/s and MPix/s "
          f"from the best time; peak = extra memory over the pre-forward state (CPU: VmHWM - VmRSS)")
    print()
    print("| device | tile | dtype | attention | best ms | median ms | pairs/s | MPix/s | peak MiB |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if "error" in r:
            print(f"| {r['device']} | {r['tile']} | {r['dtype']} | {r['attention']} | error: {r['error']} | | | | |")
            continue
        print(
            f"| {r['device']} | {r['tile']} | {r['dtype']} | {r['attention']} | {r['best_s'] * 1e3:.0f} | "
            f"{r['median_s'] * 1e3:.0f} | "
            f"{r['pairs_per_s']:.2f} | {r['mpix_per_s']:.2f} | {r['peak_mib']:.0f} |"
        )
    print()
    print("| device | tile | dtype | best time sdpa/explicit | median time sdpa/explicit | peak memory sdpa/explicit |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    index = {(r["device"], r["tile"], r["dtype"], r["attention"]): r for r in results if "error" not in r}
    for (device, tile, dtype, attention), r in index.items():
        other = index.get((device, tile, dtype, "explicit"))
        if attention != "sdpa" or other is None:
            continue
        mem = r["peak_mib"] / other["peak_mib"] if other["peak_mib"] > 0 else float("nan")
        print(f"| {device} | {tile} | {dtype} | {r['best_s'] / other['best_s']:.2f} | "
              f"{r['median_s'] / other['median_s']:.2f} | {mem:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

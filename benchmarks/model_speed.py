"""FSG-Net forward speed and peak memory: SDPA vs explicit attention, fp32 vs bf16 autocast, per tile size.

Every configuration runs in a fresh subprocess so that peak memory is its own: on CPU the peak resident set
(``VmHWM`` from ``/proc/self/status``) minus the resident set just before the first forward; on CUDA
``torch.cuda.max_memory_allocated`` minus the allocation before the first forward.

    python benchmarks/model_speed.py                 # tiles 256 and 512, fp32 and bf16, CPU (+ CUDA if present)
    python benchmarks/model_speed.py --quick         # tile 256 only, fewer repeats
    python benchmarks/model_speed.py --backward      # time a training step (forward + backward) instead

Backends (``--compare``): every backend x precision of :class:`cdmap.inference.Predictor` against today's
torch fp32 path (eager, SDPA attention) in one run, configurations interleaved round by round, each in a fresh
process: speed-up (median over rounds of the per-round ratio of best times), setup time (first call: export +
compile + check, cold and warm cache), peak memory, max P(change) difference and mask agreement with the torch
fp32 result, F1 on held-out labelled pairs, and achieved FLOP/s (``torch.utils.flop_counter``, attention
counted at its true C/8 width) as a fraction of the CPU's peak::

    python benchmarks/model_speed.py --compare --model best.pt --data VAL_FOLDER --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
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


# ----- backends x precisions (--compare) -------------------------------------------------------------------------
COMPARE = [
    # label, backend, precision, torch variant ("+"-separated: nchw = contiguous layout; unfolded = BatchNorm as
    # its own op; padcopy = EfficientNet "same" convs on an explicitly padded copy; chunked or sdpa = that STSAM
    # attention instead of the predictor's choice). The first row is the baseline of every ratio.
    ("torch fp32 reference (eager, NCHW, BatchNorm unfolded, SDPA)", "torch", "fp32", "nchw+unfolded+padcopy"),
    ("torch fp32 channels_last, BatchNorm unfolded (the default before BN folding)", "torch", "fp32",
     "unfolded+padcopy"),
    ("torch fp32 channels_last + BatchNorm folded", "torch", "fp32", "padcopy"),
    ("torch fp32 now (channels_last, BN folded, same-padding inside the conv)", "torch", "fp32", ""),
    ("torch fp32 now + chunked attention", "torch", "fp32", "chunked"),
    ("torch bf16 autocast channels_last, SDPA", "torch", "bf16", "sdpa"),
    ("torch bf16 autocast (now: channels_last + chunked)", "torch", "bf16", ""),
    ("compile fp32", "compile", "fp32", ""),
    ("onnxruntime fp32", "onnxruntime", "fp32", ""),
    ("openvino fp32", "openvino", "fp32", ""),
    ("openvino bf16", "openvino", "bf16", ""),
    ("auto fp32", "auto", "fp32", ""),
]


def _padcopy_forward(self, x):
    """The EfficientNet "same" convolution as it was: always on an explicitly zero-padded copy of ``x``."""
    import math

    import torch.nn.functional as F

    ih, iw = x.shape[-2], x.shape[-1]
    (kh, kw), (sh, sw) = self.kernel_size, self.stride
    pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
    pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def load_eval_pairs(folder: Path | None, tile: int, count: int, ckpt) -> tuple[list, list, list, list]:
    """Normalised (a, b) float32 (C, tile, tile) pairs, labels and names: real pairs from ``folder``
    (``A/``, ``B/``, ``label/``), cropped/padded to ``tile``, else ``count`` seeded random pairs."""
    import numpy as np

    from cdmap.inference import Normalisation

    norm = Normalisation.of(ckpt.mean, ckpt.std)
    if folder is None:
        rng = np.random.default_rng(0)
        out = []
        for _ in range(count):
            a = rng.uniform(0, 255, (ckpt.in_channels, tile, tile)).astype(np.float32)
            b = np.clip(a + rng.normal(0, 40, a.shape), 0, 255).astype(np.float32)
            out.append((norm.apply(a, None), norm.apply(b, None)))
        return [o[0] for o in out], [o[1] for o in out], [None] * count, [f"random{i}" for i in range(count)]
    from cdmap.data import find_pairs, read_image, read_label

    xa, xb, labels, names = [], [], [], []
    for pair in find_pairs(folder):
        a, inv_a = read_image(pair.a)
        b, inv_b = read_image(pair.b)
        lab = read_label(pair.label)
        a, b, lab = (np.asarray(x)[..., :tile, :tile] for x in (a, b, lab))
        if a.shape[-2:] != (tile, tile):
            continue
        valid = ~(inv_a | inv_b)[:tile, :tile]
        xa.append(norm.apply(a, valid))
        xb.append(norm.apply(b, valid))
        labels.append(lab)
        names.append(pair.name)
    return xa, xb, labels, names


def _checkpoint(path: str | None, tile: int):
    import torch

    from cdmap.checkpoint import Checkpoint, load_checkpoint
    from cdmap.models import FSGNet, ModelConfig

    if path:
        return load_checkpoint(path)
    torch.manual_seed(0)
    model = FSGNet(ModelConfig())
    with torch.no_grad():
        for block in model.stsam:
            block.cross.gamma.fill_(0.5)
    return Checkpoint(ModelConfig(), model.state_dict(), [110.0] * 3, [50.0] * 3, tile_size=tile)


def _predictor(cfg: dict, ckpt):
    import torch

    from cdmap.backends import torch_backend
    from cdmap.inference import Predictor
    from cdmap.models.backbones import _SameConv2d

    variant = set(cfg["variant"].split("+"))
    fold = torch_backend.FOLD_BATCHNORM
    torch_backend.FOLD_BATCHNORM = "unfolded" not in variant
    try:
        pred = Predictor.from_checkpoint(ckpt, "cpu", cfg["precision"], backend=cfg["backend"])
    finally:
        torch_backend.FOLD_BATCHNORM = fold
    if "padcopy" in variant:
        for module in pred.model.modules():
            if isinstance(module, _SameConv2d):
                module.forward = types.MethodType(_padcopy_forward, module)
    for mode in ("chunked", "sdpa"):
        if mode in variant:
            for block in pred.model.stsam:  # ModelConfig validates sdpa/explicit only: set the blocks directly
                block.attention = mode
    if "nchw" in variant:  # today's layout: contiguous weights and inputs
        for module in pred.model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.data = module.weight.data.contiguous()
        pred.channels_last = False
    return pred


def _timing_batch(cfg: dict, ckpt):
    import numpy as np

    xa, xb, _, _ = load_eval_pairs(Path(cfg["data"]) if cfg["data"] else None, cfg["tile"], cfg["batch"], ckpt)
    n = cfg["batch"]
    reps = (n + len(xa) - 1) // len(xa)
    return xa, xb, np.stack((xa * reps)[:n]), np.stack((xb * reps)[:n])


def compare_worker(cfg: dict) -> dict:
    """One backend x precision in a fresh process: setup (first call), peak memory, probabilities to
    ``cfg['out']``."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    os.environ["CDMAP_CACHE_DIR"] = cfg["cache"]
    torch.set_num_threads(cfg["threads"])
    ckpt = _checkpoint(cfg["model"], cfg["tile"])
    xa, xb, ta, tb = _timing_batch(cfg, ckpt)
    base = _proc_status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    pred = _predictor(cfg, ckpt)
    pred.probability(ta, tb)
    first_s = time.perf_counter() - t0
    for _ in range(cfg["warmup"]):
        pred.probability(ta, tb)
    peak = _proc_status_kib("VmHWM") * 1024 - base
    probs = [pred.probability(a, b).numpy()[0] for a, b in zip(xa, xb, strict=True)]
    np.save(cfg["out"], np.stack(probs).astype(np.float32))
    return {**cfg, "first_call_s": first_s, "setup_s": pred.setup_s, "backend_used": pred.backend,
            "peak_mib": peak / 2**20}


def timing_worker(cfgs: list[dict]) -> dict:
    """All configurations in ONE process, calls interleaved A B C A B C ... (warm cache): per-round times."""
    import torch

    sys.path.insert(0, str(REPO))
    os.environ["CDMAP_CACHE_DIR"] = cfgs[0]["cache"]
    torch.set_num_threads(cfgs[0]["threads"])
    ckpt = _checkpoint(cfgs[0]["model"], cfgs[0]["tile"])
    _, _, ta, tb = _timing_batch(cfgs[0], ckpt)
    preds = [_predictor(c, ckpt) for c in cfgs]
    for p in preds:
        for _ in range(1 + cfgs[0]["warmup"]):
            p.probability(ta, tb)
    times: list[list[float]] = [[] for _ in preds]
    for _ in range(cfgs[0]["repeats"]):
        for p, acc in zip(preds, times, strict=True):
            t = time.perf_counter()
            p.probability(ta, tb)
            acc.append(time.perf_counter() - t)
    return {"times_s": times, "ran": [p.backend for p in preds]}


def _f1(prob, label, threshold: float) -> float:
    import numpy as np

    keep = label <= 1
    pred, lab = (prob >= threshold)[keep], label[keep] == 1
    tp = float(np.sum(pred & lab))
    fp, fn = float(np.sum(pred & ~lab)), float(np.sum(~pred & lab))
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0


def count_flops(tile: int, batch: int) -> float:
    """Forward FLOPs of FSG-Net (attention at its true C/8 width: chunked mode) for one batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cdmap.models import FSGNet, ModelConfig

    model = FSGNet(ModelConfig()).eval()
    for block in model.stsam:
        block.attention = "chunked"
    a = torch.zeros(batch, 3, tile, tile)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(a, a)
    return float(counter.get_total_flops())


def measure_peak_gflops(threads: int) -> dict:
    """Best sgemm / bf16 gemm rate of this CPU with ``threads`` threads (a practical peak)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(5))
        out[name] = 2 * 2048**3 / best / 1e9
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare_main(args) -> int:
    import tempfile

    import numpy as np

    sys.path.insert(0, str(REPO))
    from cdmap import backends

    tile, batch = args.tiles[0], args.batch_size
    work = Path(tempfile.mkdtemp(prefix="cdmap-compare-"))
    cache = Path(args.cache) if args.cache else work / "cache"  # cold cache: the first round pays the export
    configs = [dict(label=label, backend=be, precision=prec, variant=var, tile=tile, batch=batch,
                    threads=args.threads or 1, repeats=args.repeats, warmup=args.warmup, model=args.model,
                    data=str(args.data) if args.data else None, cache=str(cache))
               for n, (label, be, prec, var) in enumerate(COMPARE)
               if (be in ("torch", "auto") or backends.installed(be))
               and (n == 0 or not args.only or any(key in label for key in args.only))]
    print(f"# load average before: {_load()}  (os.cpu_count()={os.cpu_count()}); installed: {backends.available()}")
    peaks = [measure_peak_gflops(args.threads or 1)]
    setups: list[list[dict]] = [[] for _ in configs]
    for round_no in range(2):  # round 1: cold cache (export), round 2: warm
        for i, cfg in enumerate(configs):
            r = _spawn_compare({**cfg, "out": str(work / f"prob{i}_{round_no}.npy")}, args.timeout)
            setups[i].append(r)
            msg = r.get("error") or f"first call {r['first_call_s']:.1f} s, ran {r['backend_used']}"
            print(f"  setup {round_no + 1}: {cfg['label']}: {msg}, load {_load()}", file=sys.stderr)
    good = [i for i, s in enumerate(setups) if all("error" not in r for r in s)]
    timing = _spawn_compare([{**configs[i], "repeats": args.repeats * args.rounds} for i in good], args.timeout,
                            worker="--timing-worker")
    if "error" in timing:
        print(f"timing run failed: {timing['error']}", file=sys.stderr)
        return 1
    peaks.append(measure_peak_gflops(args.threads or 1))
    peak = {k: max(p[k] for p in peaks) for k in peaks[0]}
    times = {i: t for i, t in zip(good, timing["times_s"], strict=True)}
    ckpt = _checkpoint(args.model, tile)
    _, _, labels, names = load_eval_pairs(args.data, tile, batch, ckpt)
    threshold = float(ckpt.threshold)
    ref = np.load(work / "prob0_0.npy")
    flops = count_flops(tile, batch)
    print(f"# load average after: {_load()}")
    print(f"# FSG-Net {ckpt.model_config.backbone}, tile {tile}, batch {batch}, {args.threads or 1} thread(s); speed: "
          f"all configurations in one process, calls interleaved, {args.repeats * args.rounds} rounds after warm-up, "
          f"speed-up = median over rounds of (torch fp32 time / this time) in the same round; setup and peak memory: "
          f"a fresh process each, cold cache then warm; {len(names)} eval pairs "
          f"({'real' if args.data else 'random'}), mask threshold {threshold:.4f}")
    print(f"# forward FLOPs per batch {flops / 1e9:.2f} G (torch.utils.flop_counter, attention at its true width); "
          f"gemm peak (best 2048^3 matmul, {args.threads or 1} thread(s)) {peak['fp32']:.0f} GFLOP/s fp32, "
          f"{peak['bf16']:.0f} GFLOP/s bf16")
    print()
    print("| configuration | ran | speed-up vs torch fp32 | median ms | first call s (cold / warm cache) | "
          "peak MiB | max prob diff | mask agreement % | F1 | max abs dF1 (all, per data set) | % of gemm peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    subsets = {"all": list(range(len(names)))}
    for prefix in sorted({n.split("_")[0] for n in names}):
        subsets[prefix] = [i for i, n in enumerate(names) if n.split("_")[0] == prefix]
    ref_f1 = {k: _f1(ref[idx], np.stack([labels[i] for i in idx]), threshold)
              for k, idx in subsets.items()} if labels and labels[0] is not None else {}
    rows = []
    for i, cfg in enumerate(configs):
        if i not in times:
            err = next((r["error"] for r in setups[i] if "error" in r), "?")
            print(f"| {cfg['label']} | error: {err} | | | | | | | | | |")
            continue
        ratios = sorted(b / t for b, t in zip(times[0], times[i], strict=True))
        med = sorted(times[i])[len(times[i]) // 2]
        prob = np.load(work / f"prob{i}_0.npy")
        diff = float(np.abs(prob - ref).max())
        agree = float(np.mean((prob >= threshold) == (ref >= threshold))) * 100
        f1s = {k: _f1(prob[idx], np.stack([labels[j] for j in idx]), threshold)
               for k, idx in subsets.items()} if ref_f1 else {}
        d_f1 = max((abs(f1s[k] - ref_f1[k]) for k in f1s), default=float("nan"))
        prec_peak = peak["bf16"] if cfg["precision"] == "bf16" else peak["fp32"]
        firsts = " / ".join(f"{r['first_call_s']:.1f}" for r in setups[i])
        row = dict(cfg, speedup=ratios[len(ratios) // 2], median_s=med, diff=diff, agree=agree,
                   f1=f1s.get("all", float("nan")), d_f1=d_f1, frac_peak=flops / med / 1e9 / prec_peak,
                   peak_mib=max(r["peak_mib"] for r in setups[i]), first=firsts,
                   ran=timing["ran"][good.index(i)], f1s=f1s)
        rows.append(row)
        print(f"| {cfg['label']} | {row['ran']} | {row['speedup']:.2f} | {med * 1e3:.0f} | {firsts} | "
              f"{row['peak_mib']:.0f} | {diff:.1e} | {agree:.3f} | {row['f1']:.4f} | {d_f1:.4f} | "
              f"{row['frac_peak'] * 100:.0f} |")
    if ref_f1:
        print()
        print("F1 of torch fp32 per subset: " + ", ".join(f"{k} {v:.4f}" for k, v in ref_f1.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "flops": flops, "peak_gflops": peak}, indent=2, default=str))
    return 0


def _spawn_compare(cfg: dict | list, timeout: float, worker: str = "--compare-worker") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), worker, json.dumps(cfg)]
    first = cfg[0] if isinstance(cfg, list) else cfg
    env = dict(os.environ, OMP_NUM_THREADS=str(first["threads"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    p.add_argument("--compare", action="store_true",
                   help="every backend x precision against today's torch fp32 path (first --tiles value)")
    p.add_argument("--model", default=None, help="--compare: checkpoint (default: random weights)")
    p.add_argument("--data", type=Path, default=None,
                   help="--compare: folder with A/, B/, label/ of held-out pairs (default: random inputs)")
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                   help="--compare: only the configurations whose label contains one of these (plus the baseline)")
    p.add_argument("--cache", default=None, help="--compare: export cache (default: a fresh, cold one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--compare-worker", help=argparse.SUPPRESS)
    p.add_argument("--timing-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return 0
    if args.compare_worker:
        print(json.dumps(compare_worker(json.loads(args.compare_worker))))
        return 0
    if args.timing_worker:
        print(json.dumps(timing_worker(json.loads(args.timing_worker))))
        return 0
    if args.compare:
        return compare_main(args)
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

"""int8 (ONNX Runtime static QDQ quantisation) on a trained checkpoint: accuracy and speed vs fp32.

Calibrates on the training-side pairs given by ``--calib`` and measures on the held-out ``--data`` pairs:
max P(change) difference, change-mask agreement and F1 against the torch fp32 result, and the speed-up of the
int8 graph over the fp32 ONNX Runtime graph (interleaved, same process). int8 is not offered as a backend.

    python benchmarks/int8_check.py --model best.pt --data VAL --calib TRAIN --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from model_speed import _f1, load_eval_pairs
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cdmap.backends.export import export_onnx, model_sha256
    from cdmap.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    model = ckpt.build_model("cpu")
    work = Path(tempfile.mkdtemp(prefix="cdmap-int8-"))
    fp32_path, _, _ = export_onnx(model, model_sha256(model, ckpt), ckpt.in_channels, args.tile, args.tile,
                                  root=work)
    ca, cb, _, _ = load_eval_pairs(args.calib, args.tile, 0, ckpt)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"a": a[None], "b": b[None]} for a, b in zip(ca, cb, strict=True)])

        def get_next(self):
            return next(self.items, None)

    pre = work / "pre.onnx"
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    int8_path = work / "int8.onnx"
    t = time.perf_counter()
    quantize_static(str(pre), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=["Conv", "MatMul"])
    quant_s = time.perf_counter() - t

    def session(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    s32, s8 = session(fp32_path), session(int8_path)
    xa, xb, labels, names = load_eval_pairs(args.data, args.tile, 0, ckpt)
    p32 = np.stack([s32.run(None, {"a": a[None], "b": b[None]})[0][0] for a, b in zip(xa, xb, strict=True)])
    p8 = np.stack([s8.run(None, {"a": a[None], "b": b[None]})[0][0] for a, b in zip(xa, xb, strict=True)])
    thr = float(ckpt.threshold)
    lab = np.stack(labels)
    batch = {"a": np.stack(xa[:2]), "b": np.stack(xb[:2])}
    t32, t8 = [], []
    for _ in range(args.rounds):
        for sess, acc in ((s32, t32), (s8, t8)):
            t = time.perf_counter()
            sess.run(None, batch)
            acc.append(time.perf_counter() - t)
    print(f"int8 QDQ (Conv+MatMul, per-channel, {len(ca)} calibration pairs, quantised in {quant_s:.0f} s), "
          f"{len(names)} held-out pairs, tile {args.tile}, {args.threads} thread(s)")
    print(f"max prob diff vs fp32 {np.abs(p8 - p32).max():.3f}, mask agreement "
          f"{np.mean((p8 >= thr) == (p32 >= thr)) * 100:.2f} %, F1 fp32 {_f1(p32, lab, thr):.4f} int8 "
          f"{_f1(p8, lab, thr):.4f}, speed-up int8/fp32 ORT (best of {args.rounds}) {min(t32) / min(t8):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One short GPU check of the Triton kernel: correctness against the reference, then speed.

Run on a machine with a CUDA GPU (and ``pip install triton``), from the repository root:

    QUIKFT_DATA=../shared/data python tools/gpu_check.py --packed runs/w3 [--model smollm2-135m]

1. Correctness: layers quantized by our own GPTQ/RTN from random weights (2/3/4/8 bits, with
   and without act-order, group sizes that do and do not divide ``in - k``, k = 0 and k > 0,
   with a bias), each run through the ``triton`` kernel and the ``torch`` reference on the GPU
   for 1 (GEMV) and 37 (GEMM) rows in fp16 and bf16; the table gives the max error relative
   to the output's scale (fp32 reference on the same device).
2. Speed, per layer: the default model's linear shapes (576x576, 192x576, 1536x576, 576x1536)
   at 3 bits, k = 128, group 128, act-order: microseconds per call of the Triton kernel vs a
   dense fp16 ``F.linear``, for 1 and 512 rows (CUDA events, median of 50).
3. Speed, whole model (with ``--packed``): decode and prefill tokens/s of the packed checkpoint
   (``quikft.load(..., dtype=fp16, device=cuda)``) vs the fp16 model, greedy, 512-token prompt.

``--interpret`` runs part 1 on the CPU through Triton's interpreter (a smoke test of the
script itself; parts 2 and 3 need a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", default=None, help="packed checkpoint for the whole-model rows")
    parser.add_argument("--model", default=None, help="FP model of the whole-model rows [default model]")
    parser.add_argument("--interpret", action="store_true", help="correctness only, on CPU (TRITON_INTERPRET=1)")
    return parser.parse_args()


def quantized_layer(bits: int, k: int, shape: tuple[int, int], group_size: int, act_order: bool, device: str,
                    seed: int = 0):
    import torch

    from quikft.nn import QuikLinear
    from quikft.quant.gptq import gptq_quantize, rtn_quantize
    from quikft.quant.scheme import QuantScheme

    out_features, in_features = shape
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    salient = torch.randperm(in_features, generator=gen)[:k]
    if act_order:
        x = torch.randn(4 * in_features, in_features, generator=gen) * torch.rand(in_features, generator=gen) * 3
        result = gptq_quantize(weight, 2 * x.T @ x / x.shape[0], salient,
                               QuantScheme(bits, group_size, act_order=True))
    else:
        result = rtn_quantize(weight, salient, QuantScheme(bits, group_size))
    bias = torch.randn(out_features, generator=gen) * 0.1
    return QuikLinear.from_quantized(result, bias).to(device)


def correctness(device: str) -> list[str]:
    import torch

    from quikft.nn import set_kernel

    cases = [(bits, k, shape, group, act)
             for bits in (2, 3, 4, 8)
             for k, shape, group, act in ((0, (96, 256), 128, False), (24, (200, 300), 64, True),
                                          (24, (64, 300), -1, True), (7, (48, 100), 32, False))]
    dtypes = (torch.float16,) if device == "cpu" else (torch.float16, torch.bfloat16)
    rows = ["| bits | k | out x in | group | act-order | dtype | rows | max error / scale | ok |",
            "|---|---|---|---|---|---|---|---|---|"]
    failures = 0
    for seed, (bits, k, shape, group, act) in enumerate(cases):
        layer = quantized_layer(bits, k, shape, group, act, device, seed)
        for dtype in dtypes:
            for n_rows in (1, 37):
                x = torch.randn(n_rows, shape[1], device=device)
                layer.kernel = "torch"
                reference = layer(x.float()).double()
                set_kernel(layer, "triton" if device != "cpu" else None)
                if device == "cpu":  # the interpreter: call the kernel function directly
                    from quikft.nn.triton_ops import quik_linear

                    y = quik_linear(x.to(dtype), layer)
                else:
                    y = layer(x.to(dtype))
                scale = float(reference.abs().max()) or 1.0
                error = float((y.double() - reference).abs().max()) / scale
                ok = error < 2e-2
                failures += not ok
                rows.append(f"| {bits} | {k} | {shape[0]}x{shape[1]} | {group} | {act} | "
                            f"{str(dtype).removeprefix('torch.')} | {n_rows} | {error:.2e} | {'yes' if ok else 'NO'} |")
    rows.append(f"\n{len(rows) - 2 - failures} of {len(rows) - 2} cases within 2e-2 of the fp32 reference")
    return rows


def cuda_time_us(fn, repeats: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) * 1000)
    return statistics.median(times)


def layer_speed() -> list[str]:
    import torch
    import torch.nn.functional as F

    rows = ["| out x in | rows | triton us | dense fp16 us | speed-up |", "|---|---|---|---|---|"]
    for shape in ((576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096)):
        layer = quantized_layer(3, 128, shape, 128, True, "cuda")
        layer.kernel = "triton"
        dense = layer.effective_weight(torch.float16).cuda()
        for n_rows in (1, 512):
            x = torch.randn(n_rows, shape[1], device="cuda", dtype=torch.float16)
            ours = cuda_time_us(lambda: layer(x))  # noqa: B023
            theirs = cuda_time_us(lambda: F.linear(x, dense))  # noqa: B023
            rows.append(f"| {shape[0]}x{shape[1]} | {n_rows} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |")
    return rows


def model_speed(packed: str, model_name: str | None) -> list[str]:
    import torch

    import quikft
    from quikft.models import load_model

    rows = ["| model | decode tok/s | prefill tok/s |", "|---|---|---|"]
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0)).cuda()
    fp, _ = load_model(model_name, dtype=torch.float16, device="cuda")
    for label, model in (("fp16", fp), ("packed (triton)", quikft.load(packed, dtype=torch.float16, device="cuda"))):
        with torch.inference_mode():
            model(input_ids=ids)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids)
            torch.cuda.synchronize()
            prefill = ids.shape[1] / (time.perf_counter() - start)
            model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            torch.cuda.synchronize()
            start = time.perf_counter()
            model.generate(input_ids=ids, max_new_tokens=65, min_new_tokens=65, do_sample=False)
            torch.cuda.synchronize()
            decode = 64 / (time.perf_counter() - start - ids.shape[1] / prefill)
        rows.append(f"| {label} | {decode:.1f} | {prefill:.0f} |")
    return rows


def main() -> None:
    args = parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.interpret and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or pass --interpret for the correctness part on CPU")
    device = "cpu" if args.interpret else "cuda"
    print("\n".join(correctness(device)))
    if device == "cuda":
        print("\n" + "\n".join(layer_speed()))
        if args.packed:
            print("\n" + "\n".join(model_speed(args.packed, args.model)))
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")


if __name__ == "__main__":
    main()

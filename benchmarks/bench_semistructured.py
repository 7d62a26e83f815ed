"""2:4 semi-structured sparse kernels against dense, on the ddpm-cifar10 UNet (CUDA, sm80+ only).

    python benchmarks/bench_semistructured.py [--batch 256] [--repeats 20] [--json out.json]
    python benchmarks/bench_semistructured.py --check_swap   # CPU: the layer swap's reshapes, with dense weights

PyTorch's ``torch.sparse.to_sparse_semi_structured`` stores a 2:4 weight (two of every four
consecutive input weights kept) compressed and multiplies it with cuSPARSELt/CUTLASS kernels. They
serve a matrix multiply whose sparse operand is 2-D, fp16/bf16, 2:4 along its rows: here

* ``nn.Linear`` layers: the attention projections (to_q, to_k, to_v, to_out.0); the time-embedding
  layers stay dense (protected by the pruning recipe, so not 2:4);
* 1x1 convolutions (the resnets' ``conv_shortcut``) as a matmul over channels: NHWC pixels x
  (out, in) weight.

They cannot serve the 3x3 convolutions, which hold almost all of this UNet's weights and FLOPs:
a 3x3 convolution is not one matmul of a 2:4 matrix (implicit GEMM would need a sparse-conv kernel,
which PyTorch does not have), so its 2:4 zeros are still multiplied.

The model is pruned 2:4 by magnitude (:mod:`maskdm.method.pruning`, the project's pruner), cast to bf16
(the kernels take no fp32 and autocast cannot cast their weights), the eligible layers swapped;
the script checks each swapped layer's output and the UNet's against dense within tolerance,
then times each layer kind at the shapes a batch of ``--batch`` images gives it, and the whole
UNet forward (= one DDIM step of the batch: the DDIM update itself is a few elementwise ops).
It prints per layer kind where 2:4 helps and where it cannot; the sample stage offers it only if
the whole forward is faster.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from maskdm.masks import maskable_modules
from maskdm.ddpm.models import build_unet
from maskdm.method.pruning import PruneConfig, prune
from maskdm.evaluation.speed import SemiStructuredConv1x1, SemiStructuredLinear  # the speed stage's own layers


def is_1x1(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.groups == 1 and module.dilation == (1, 1))


def kind_of(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "attention projection (Linear)" if ".attentions." in f".{name}" else "other Linear"
    if is_1x1(module):
        return "1x1 conv"
    return f"{module.kernel_size[0]}x{module.kernel_size[1]} conv" if isinstance(module, nn.Conv2d) else type(module).__name__


def is_2_4(weight: torch.Tensor) -> bool:
    rows = weight.reshape(weight.shape[0], -1)
    return rows.shape[1] % 4 == 0 and bool(((rows.reshape(rows.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def swap_layers(unet: nn.Module, to_sparse: Callable[[torch.Tensor], torch.Tensor], min_dim: int = 0) -> dict[str, str]:
    """Replace every 2:4 Linear and 1x1 conv of ``unet`` (in place); returns the swapped names -> kind."""
    swapped = {}
    for name, module in list(maskable_modules(unet).items()):
        eligible = isinstance(module, nn.Linear) or is_1x1(module)
        if not eligible or not is_2_4(module.weight) or min(module.weight.shape[0], module.weight[0].numel()) < min_dim:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        new = SemiStructuredLinear(module, to_sparse) if isinstance(module, nn.Linear) else SemiStructuredConv1x1(module, to_sparse)
        setattr(parent, child, new)
        swapped[name] = kind_of(name, module)
    return swapped


def weight_shares(unet: nn.Module, resolution: int) -> dict[str, dict[str, float]]:
    """Per layer kind: share of the weights and of the multiply-adds of one forward pass (hooks on a 1-image pass)."""
    macs: dict[str, float] = {}
    params: dict[str, float] = {}
    hooks = []
    for name, module in maskable_modules(unet).items():
        kind = kind_of(name, module)
        params[kind] = params.get(kind, 0) + module.weight.numel()

        def hook(mod, inputs, output, kind=kind):
            spatial = output.shape[2] * output.shape[3] if output.dim() == 4 else output[..., 0].numel()
            macs[kind] = macs.get(kind, 0) + mod.weight.numel() * spatial

        hooks.append(module.register_forward_hook(hook))
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    with torch.no_grad():
        unet(torch.zeros(1, 3, resolution, resolution, device=device, dtype=dtype), torch.tensor([10], device=device))
    for h in hooks:
        h.remove()
    total_p, total_m = sum(params.values()), sum(macs.values())
    return {k: {"weights": params[k] / total_p, "macs": macs.get(k, 0.0) / total_m} for k in params}


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def layer_inputs(unet: nn.Module, names: list[str], x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named layer sees in a forward pass of ``x``."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(unet.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, i[0].detach())) for n in names]
    with torch.no_grad():
        unet(x, t)
    for h in hooks:
        h.remove()
    return seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ddpm-cifar10")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="")
    parser.add_argument("--check_swap", action="store_true", help="On any device: swap with dense weights and check the reshapes only.")
    args = parser.parse_args(argv)

    cuda_ok = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    if not cuda_ok and not args.check_swap:
        print("semi-structured (2:4) sparse kernels need a CUDA GPU of compute capability 8.0 or newer (sm80+); "
              "none here, nothing measured.")
        return 0
    device = torch.device("cuda" if cuda_ok else "cpu")
    torch.manual_seed(0)
    unet = build_unet(args.arch).eval()
    prune(unet, PruneConfig(ratio=0.5, pattern="2:4"))  # the protected layers stay dense
    resolution = int(unet.config.sample_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = unet.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    shares = weight_shares(dense, resolution)
    x = torch.randn(args.batch, 3, resolution, resolution, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (args.batch,), device=device)

    import copy

    sparse = copy.deepcopy(dense)
    if args.check_swap:
        to_sparse = lambda w: w.clone()  # noqa: E731  dense weights: checks the wrappers' reshapes only
    else:
        from torch.sparse import to_sparse_semi_structured

        to_sparse = to_sparse_semi_structured
    swapped = swap_layers(sparse, to_sparse)
    kinds = sorted(set(swapped.values()))
    print(f"# {args.arch}, batch {args.batch}, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {dtype}; {len(swapped)} layers swapped: "
          + ", ".join(f"{sum(1 for k in swapped.values() if k == kind)} {kind}" for kind in kinds))
    print("\n| layer kind | share of weights | share of multiply-adds | 2:4 kernels |")
    print("|---|---|---|---|")
    for kind, share in sorted(shares.items(), key=lambda kv: -kv[1]["macs"]):
        served = "served" if kind in kinds else ("cannot (not one 2-D matmul)" if "3x3" in kind else "not 2:4 (protected) or not eligible")
        print(f"| {kind} | {share['weights']:.1%} | {share['macs']:.1%} | {served} |")

    with torch.no_grad():
        ref = dense(x, t).sample.float()
        out = sparse(x, t).sample.float()
    rel = float((out - ref).norm() / ref.norm())
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    print(f"\nUNet output, swapped vs dense: relative error {rel:.2e} (tolerance {tolerance:g})")
    if not rel <= tolerance:
        print("MISMATCH: the swapped model does not compute the dense one's function")
        return 1
    if args.check_swap:
        print("check_swap: the wrappers reproduce the dense layers; no timing on dense weights.")
        return 0

    result: dict = {"device": torch.cuda.get_device_name(), "batch": args.batch, "relative_error": rel, "layers": {}, "shares": shares}
    inputs = layer_inputs(dense, list(swapped), x, t)
    dense_modules, sparse_modules = dict(dense.named_modules()), dict(sparse.named_modules())
    print("\n| layer kind | layers | dense ms (sum) | 2:4 ms (sum) | speed-up |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for kind in kinds:
            names = [n for n, k in swapped.items() if k == kind]
            d = sum(timed(lambda n=n: dense_modules[n](inputs[n]), args.repeats, device) for n in names)
            s = sum(timed(lambda n=n: sparse_modules[n](inputs[n]), args.repeats, device) for n in names)
            result["layers"][kind] = {"count": len(names), "dense_ms": d * 1e3, "sparse_ms": s * 1e3, "speedup": d / s}
            print(f"| {kind} | {len(names)} | {d * 1e3:.3f} | {s * 1e3:.3f} | {d / s:.2f}x |")
        d = timed(lambda: dense(x, t), args.repeats, device)
        s = timed(lambda: sparse(x, t), args.repeats, device)
    result.update(forward_dense_ms=d * 1e3, forward_sparse_ms=s * 1e3, forward_speedup=d / s,
                  image_steps_per_s_dense=args.batch / d, image_steps_per_s_sparse=args.batch / s)
    print(f"\nwhole UNet forward (one DDIM step of {args.batch} images): dense {d * 1e3:.2f} ms, 2:4 {s * 1e3:.2f} ms, "
          f"{d / s:.2f}x -> {args.batch / d:,.0f} vs {args.batch / s:,.0f} image-steps/s")
    print("verdict: " + ("faster: worth offering as a sample option" if d / s > 1.02 else
                         "not faster: the 3x3 convolutions dominate and the served matmuls are small; not offered"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

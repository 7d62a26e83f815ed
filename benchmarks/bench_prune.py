"""Seconds to prune, extract masks and compute stats for a DDPM UNet on this machine.

    python benchmarks/bench_prune.py [--arch ddpm-cifar10] [--repeats 3] [--ratio 0.5] [--threads 1,2]

Randomly initialised weights in the chosen architecture (``ddpm-cifar10`` is the 35.7M-parameter
google/ddpm-cifar10-32 config). Every case runs on a fresh copy of the same model; the table
gives the median and the fastest of ``--repeats`` runs for each torch thread count, all measured
side by side in one process (on a shared 2-core machine one thread can be far faster than two).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from maskdm.masks import masks_from_weights
from maskdm.ddpm.models import build_unet, count_parameters
from maskdm.method.pruning import (
    PruneConfig,
    compact_state_dict,
    expand_compact_state_dict,
    prune,
    pruning_stats,
)


def timed(action: Callable[[], object], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return seconds


def prune_cases(ratio: float) -> dict[str, PruneConfig]:
    return {
        f"prune magnitude, layer, unstructured {ratio:g}": PruneConfig(ratio=ratio),
        f"prune magnitude, global, unstructured {ratio:g}": PruneConfig(ratio=ratio, scope="global"),
        "prune magnitude, layer, 2:4": PruneConfig(ratio=0.5, pattern="2:4"),
        f"prune random, layer, unstructured {ratio:g}": PruneConfig(ratio=ratio, pruner="random"),
        f"prune random, global, unstructured {ratio:g}": PruneConfig(ratio=ratio, pruner="random", scope="global"),
    }


def measure(dense: torch.nn.Module, ratio: float, repeats: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    for label, config in prune_cases(ratio).items():
        # deepcopy outside the timed region: prune works in place, each repeat needs a dense model.
        copies = [copy.deepcopy(dense) for _ in range(repeats)]
        rows[label] = timed(lambda: prune(copies.pop(), config), repeats)

    pruned = copy.deepcopy(dense)
    result = prune(pruned, PruneConfig(ratio=ratio))
    names = list(result.masks)
    rows["masks_from_weights (all prunable layers)"] = timed(lambda: masks_from_weights(pruned, names), repeats)
    rows["pruning_stats (incl. writing dense + compact checkpoints)"] = timed(
        lambda: pruning_stats(pruned, result), repeats
    )
    rows["compact_state_dict + expand_compact_state_dict"] = timed(
        lambda: expand_compact_state_dict(compact_state_dict(pruned, result.masks)), repeats
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ddpm-cifar10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, measured in turn")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    thread_counts = [int(t) for t in args.threads.split(",")]

    torch.manual_seed(0)
    dense = build_unet(args.arch).eval()
    load_before = os.getloadavg()[0]
    by_threads = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        by_threads[threads] = measure(dense, args.ratio, args.repeats)
    load_after = os.getloadavg()[0]

    pruned = copy.deepcopy(dense)
    result = prune(pruned, PruneConfig(ratio=args.ratio))
    stats = pruning_stats(pruned, result)

    print(
        f"arch {args.arch} ({count_parameters(dense) / 1e6:.1f}M params, "
        f"{stats['prunable_weights'] / 1e6:.1f}M prunable), "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"repeats {args.repeats}, 1-min load average {load_before:.1f} before / {load_after:.1f} after"
    )
    print()
    thread_labels = [f"{t} thread{'s' if t > 1 else ''}" for t in thread_counts]
    header = " | ".join(f"median s, {label} | min s, {label}" for label in thread_labels)
    print(f"| step | {header} |")
    print("|---|" + "---:|" * (2 * len(thread_counts)))
    for label in by_threads[thread_counts[0]]:
        cells = " | ".join(
            f"{statistics.median(by_threads[t][label]):.3f} | {min(by_threads[t][label]):.3f}" for t in thread_counts
        )
        print(f"| {label} | {cells} |")
    print()
    print(
        f"checkpoint at ratio {args.ratio:g} (magnitude, layer): dense {stats['dense_checkpoint_bytes']:,} B, "
        f"compact {stats['compact_checkpoint_bytes']:,} B ({stats['checkpoint_size_ratio']:.3f} of dense); "
        f"sparsity {stats['sparsity']:.4f}, sparsity_all_params {stats['sparsity_all_params']:.4f}, "
        f"compression_ratio {stats['compression_ratio']:.3f}"
    )


if __name__ == "__main__":
    main()

"""The sweep presets (``--preset``): what the demo, paper and ldm-celebahq sweeps run, stage by stage."""

from __future__ import annotations

import copy

#: ``demo``: the shipped model and the embedded dataset; step counts sized so the whole sweep (3
#: ratios, mask_training=both, 45 stage runs) fits 15 minutes on an unloaded 2-core CPU (the demo
#: model ships with the package, nothing is pretrained). How that was measured and
#: estimated: docs/details/main.md.
DEMO = {
    "model": "demo",
    "dataset": "shapes",
    "ratios": "0.3,0.5,0.7",
    "pruner": "magnitude",
    "pattern": "unstructured",
    "scope": "layer",
    "stages": {
        # Empty: the shipped demo model, made by the pretrain entry point's defaults.
        "pretrain": {},
        "prune": {"protect": "conv_in,conv_out,time_emb,class_emb", "seed": "0"},
        # 1,024 images in 32 batches; an update measures 2 of them, so the stream passes over the
        # subset about 9 times in 150 updates.
        "baseline_loss": {"dataset_size": "1024", "batch_size": "32", "max_batches": "0", "targets": "all", "seed": "0"},
        # The best configuration of the study in docs/details/maskpro.md that fits the demo's budget:
        # logits from the magnitude score, normalised advantages, one sample per update.
        "train_masks": {
            "lr": "0.05", "epoch": "1000", "logits": "5.0", "max_step": "150", "accumulation": "2", "init": "magnitude",
            "temperature": "0.05", "samples": "1", "reward_baseline": "delta", "normalize": "true", "heldout_size": "256",
            "eval_every": "auto",
        },
        "finetune": {
            # No dropout: the finetune takes the model's own (the demo model was trained without any).
            "num_iters": "40", "train_batch_size": "32", "learning_rate": "2e-4", "lr_warmup_steps": "0",
            "ema_max_decay": "0.99", "gradient_accumulation_steps": "1",
            "save_model_steps": "40", "mixed_precision": "auto", "seed": "0",
        },
        # 512 images, 8x the 64 feature dimensions of fid_shapes: a 64x64 covariance from 128
        # images is a rough estimate. Every model gets the same seeds, so the scores compare model
        # against model on the same starting noise.
        "sample": {"total_samples": "512", "batch_size": "256", "ddim_steps": "10", "skip_type": "uniform", "eta": "0.0", "seed": "42"},
        "fid": {"features": "shapes", "dims": "2048", "batch_size": "auto"},
        # The side-by-side timing of the sweep's 13 models (80 s for 3 on a shared 2-core CPU; docs/details/speed.md).
        "speed": {"batch_size": "16", "ddim_steps": "10", "repeats": "7", "warmup": "1", "kernel": "dense"},
    },
}

#: ``paper``: google/ddpm-cifar10-32 on CIFAR-10 with the original recipe
#: (/work/shared/reference: baseline 20000 x 64 x 313 batches; masks lr 1.0, logits 5.0,
#: epoch 2000, max_step 15000; finetune 100k iterations at batch 128, lr 2e-4, EMA 0.9999,
#: dropout 0.1; 50000 samples with 100 uniform DDIM steps, seed 42; Inception FID against the
#: CIFAR-10 training set). Needs a GPU and the network (or a populated cache) for the model,
#: the dataset and the Inception weights.
PAPER = {
    "model": "google/ddpm-cifar10-32",
    "dataset": "cifar10",
    "ratios": "0.3,0.5,0.7",
    "pruner": "magnitude",
    "pattern": "unstructured",
    "scope": "layer",
    "stages": {
        "pretrain": {},
        "prune": {"protect": "conv_in,conv_out,time_emb,class_emb", "seed": "0"},
        "baseline_loss": {"dataset_size": "20000", "batch_size": "64", "max_batches": "313", "targets": "all", "seed": "0"},
        "train_masks": {"lr": "1.0", "epoch": "2000", "logits": "5.0", "max_step": "15000", "accumulation": "16"},
        "finetune": {
            "num_iters": "100000", "train_batch_size": "128", "learning_rate": "2e-4", "lr_warmup_steps": "0",
            "ema_max_decay": "0.9999", "dropout": "0.1", "gradient_accumulation_steps": "1",
            "save_model_steps": "1000", "mixed_precision": "auto", "seed": "0",
        },
        "sample": {"total_samples": "50000", "batch_size": "256", "ddim_steps": "100", "skip_type": "uniform", "eta": "0.0", "seed": "42"},
        "fid": {"features": "inception", "dims": "2048", "batch_size": "auto", "reference": "cifar10"},
        "speed": {"batch_size": "256", "ddim_steps": "10", "repeats": "9", "warmup": "2", "kernel": "dense"},
    },
}

#: ``ldm-celebahq``: the latent diffusion model of Rombach et al. (2022) on CelebA-HQ 256, as
#: published on the hub (a UNet over the 64x64x3 latents of a frozen VQ-f4 autoencoder). Only the
#: UNet is pruned, masked and finetuned; the stages train on the autoencoder's latents of the
#: dataset (cached once as a ``latent_cache`` run) and ``sample`` decodes. CelebA-HQ is not
#: downloadable by a library, so the dataset is an image folder the user gives
#: (``dataset=imagefolder:<folder>``). Stage settings are the paper preset's recipe on the latents
#: (they were not tuned for this model); FID against the same folder, as the LDM paper scores
#: CelebA-HQ against its 30,000 training images.
LDM_CELEBAHQ = copy.deepcopy(PAPER) | {"model": "CompVis/ldm-celebahq-256", "dataset": ""}
LDM_CELEBAHQ["stages"]["fid"] = {"features": "inception", "dims": "2048", "batch_size": "auto"}

PRESETS = {"demo": DEMO, "paper": PAPER, "ldm-celebahq": LDM_CELEBAHQ}

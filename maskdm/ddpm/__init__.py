"""Diffusion models: loading and saving DDPM and latent pipelines, datasets, the denoising loss and
its replayable draws, the training loop (pretrain, finetune), DDIM sampling, the CPU/GPU fast paths
and sparse storage of weights. Knows nothing of pruning or MLflow."""

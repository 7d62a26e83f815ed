"""MaskPro mask learning: better masks for the original dense weights by policy gradient.

Start from the masks a cheap pruner gave and learn, on the ORIGINAL dense weights, a distribution
over masks whose samples lower the diffusion loss. Forward passes only, under ``torch.no_grad``:
the logits move by a closed-form score (:mod:`maskdm.method.mask_policy`), never by backpropagation.

Each update samples ``samples`` masks, measures each on the same ``accumulation`` replayed batches
(:mod:`maskdm.method.replay`), and moves the logits against its advantage:

* reward ``R_k = loss(m_k) - baseline_loss`` (the initial mask's loss on the same batches, so the
  batch's own difficulty cancels exactly);
* advantage ``A_k = R_k - delta`` with ``delta`` a moving average of the rewards (the original
  recipe), or ``A_k = R_k - mean_{j != k} R_j`` (leave-one-out, ``reward_baseline="loo"``,
  needs ``samples >= 2``);
* optionally divided by a running estimate of the advantages' spread (``normalize``), so that
  ``lr`` is a step in units of the reward's noise rather than of the loss;
* ``logits <- logits - lr / samples * sum_k A_k * score(m_k)``.

While training, the current final mask can be scored every ``eval_every`` updates on a held-out
set (:class:`maskdm.method.replay.ReplayBatches` from :func:`maskdm.method.replay.heldout_batches`), so what
the user watches is mask quality on images and draws the training never saw.

This module re-exports the public names of :mod:`maskdm.method.replay` and :mod:`maskdm.method.mask_policy`,
the two parts it was split into.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from maskdm.errors import MaskDMError
from maskdm.method.mask_policy import (
    INIT_CHOICES,
    MAX_EXACT_N,
    TARGET_CHOICES,
    BernoulliPolicy,
    MaskPolicy,
    NMPattern,
    NMPolicy,
    bernoulli_sample,
    bernoulli_score,
    check_nm_masks,
    gumbel_top_n,
    magnitude_logits,
    make_policy,
    nm_log_prob,
    nm_score,
    parse_pattern,
    select_targets,
    top_entries,
    trainable_layers,
)
from maskdm.masks import set_masks
from maskdm.method.replay import (
    REPLAY_PROTOCOL_VERSION,
    ReplayBatches,
    ReplayedLosses,
    ReplaySpec,
    auto_forward_batches,
    baseline_summary,
    check_forward_batches,
    check_protocol,
    compute_baseline_losses,
    count_batches,
    ensure_masks,
    heldout_batches,
    replay_model,
    replay_settings,
    replayed_loss,
    resolve_from_baseline,
    subset_indices,
)

log = logging.getLogger(__name__)

#: Decay of the moving reward baseline ``delta`` (the original recipe's 0.99), and of the running
#: second moment of the advantages that ``normalize`` divides by.
DELTA_DECAY = 0.99
#: Version tag of logits.safetensors files.
LOGITS_FORMAT = "maskdm-maskpro-logits/1"
#: Mixed into the mask-sampling seed so its stream never coincides with the replay draws.
_MASK_STREAM = 0x6D61736B
#: How the advantage of a sample is formed: the original moving average, or leave-one-out.
REWARD_BASELINES = ("delta", "loo")
#: Held-out evaluation may cost at most this share of the forward passes with ``eval_every=auto``.
HELDOUT_SHARE = 0.10


# --- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """``max_step`` counts updates and ``epoch`` passes over the subset; training stops at whichever
    comes first (0 = no limit for either, not both). One update per ``accumulation`` batches, with
    ``samples`` masks measured on them."""

    lr: float = 1.0
    epoch: int = 2000
    max_step: int = 15000
    accumulation: int = 16
    seed: int = 0
    samples: int = 1
    reward_baseline: str = "delta"
    normalize: bool = False

    def __post_init__(self):
        if self.accumulation <= 0:
            raise MaskDMError(f"accumulation must be positive, not {self.accumulation}")
        if self.epoch < 0 or self.max_step < 0:
            raise MaskDMError("epoch and max_step must be 0 (no limit) or positive")
        if self.epoch == 0 and self.max_step == 0:
            raise MaskDMError("epoch and max_step are both 0 (no limit): set at least one")
        if not math.isfinite(self.lr):
            raise MaskDMError(f"lr must be a finite number, not {self.lr}")
        if self.samples < 1:
            raise MaskDMError(f"samples must be at least 1, not {self.samples}")
        if self.reward_baseline not in REWARD_BASELINES:
            raise MaskDMError(f"reward_baseline must be one of {', '.join(REWARD_BASELINES)}, not '{self.reward_baseline}'")
        if self.reward_baseline == "loo" and self.samples < 2:
            raise MaskDMError("reward_baseline=loo compares each sample with the others: it needs samples >= 2")


def planned_updates(num_batches: int, config: TrainConfig) -> int:
    """Updates until ``max_step`` updates or ``epoch`` passes over ``num_batches`` batches, whichever first.

    Batches form one stream that wraps around the subset, so an update's window may span two
    epochs; a last window that the epoch limit would cut short is not run.
    """
    by_epoch = (config.epoch * num_batches) // config.accumulation if config.epoch else None
    by_step = config.max_step or None
    return min(x for x in (by_epoch, by_step) if x is not None)


def heldout_scores(eval_every: int, total_updates: int) -> int:
    """How many times :meth:`MaskTrainer.run` scores the held-out set: before training, every
    ``eval_every`` updates, and after the last update if that was not one of them."""
    periodic = total_updates // eval_every if eval_every else 0
    return 1 + periodic + (1 if not eval_every or total_updates % eval_every else 0)


def auto_eval_every(heldout_images: int, update_images: int, total_updates: int) -> int:
    """The smallest held-out scoring interval (in updates) whose scores, the ones before and after
    training included, cost at most :data:`HELDOUT_SHARE` of all forward passes; 0 (before and after
    only) when even that costs more."""
    if heldout_images <= 0 or update_images <= 0 or total_updates <= 0:
        return 0
    affordable = HELDOUT_SHARE / (1 - HELDOUT_SHARE) * total_updates * update_images  # held-out images
    for every in range(1, total_updates + 1):
        if heldout_scores(every, total_updates) * heldout_images <= affordable:
            return every
    return 0


@dataclass
class UpdateMetrics:
    step: int  # 1-based update count
    epoch: float  # passes over the subset so far
    loss: float  # mean loss of the sampled masks over the update's batches
    baseline_loss: float  # mean initial-mask loss over the same batches
    improvement: float  # baseline_loss - loss
    delta: float  # moving baseline of the reward after this update
    mask_flip_rate: float  # share of all mask entries where the (first) sampled mask differs from the initial one
    sparsity: float  # share of all mask entries the (first) sampled mask drops
    advantage_scale: float  # what the advantages were divided by (1 without normalize)

    def as_metrics(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "step"}


@dataclass
class TrainState:
    """What continuing a run needs besides the logits."""

    updates: int = 0
    delta: float = 0.0
    advantage_sq: float = 0.0  # running mean of squared advantages (normalize); 0 = none yet


@dataclass
class HeldoutPoint:
    step: int  # updates done when the final mask was scored (0 = before training)
    loss: float  # mean held-out loss of the final mask at that point
    losses: np.ndarray  # per held-out batch


@dataclass
class HeldoutResult:
    """The held-out comparison of the initial and the final mask, batch by batch."""

    initial: np.ndarray  # per held-out batch
    final: np.ndarray

    @property
    def improvement(self) -> float:
        return float(np.mean(self.initial) - np.mean(self.final))

    @property
    def improvement_se(self) -> float:
        diff = self.initial - self.final
        return float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")

    def as_metrics(self) -> dict[str, float]:
        return {
            "heldout_loss_initial": float(np.mean(self.initial)),
            "heldout_loss_final": float(np.mean(self.final)),
            "heldout_improvement": self.improvement,
            "heldout_improvement_se": self.improvement_se,
        }


def mask_generator(seed: int, update: int, device: torch.device | str = "cpu", sample: int = 0) -> torch.Generator:
    """The generator of sample ``sample`` of update ``update`` (0-based): fixed by ``(seed, update,
    sample)``, so a continued run samples exactly what an uninterrupted one would. Sample 0's stream
    is the one single-sample runs always used."""
    entropy = [int(seed), int(update), _MASK_STREAM] + ([int(sample)] if sample else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] % (2**63 - 1)))


def advantages(rewards: np.ndarray, config: TrainConfig, state: TrainState) -> tuple[np.ndarray, float]:
    """The advantages of one update's rewards and the scale they were divided by; updates ``state``.

    ``delta`` is always tracked (it is logged); with ``reward_baseline="loo"`` it is not used.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    state.delta = DELTA_DECAY * state.delta + (1 - DELTA_DECAY) * float(rewards.mean())
    if config.reward_baseline == "loo":
        k = len(rewards)
        adv = rewards - (rewards.sum() - rewards) / (k - 1)
    else:
        adv = rewards - state.delta
    scale = 1.0
    if config.normalize:
        second = float(np.mean(adv**2))
        state.advantage_sq = second if state.advantage_sq == 0.0 else DELTA_DECAY * state.advantage_sq + (1 - DELTA_DECAY) * second
        if state.advantage_sq > 0.0:
            scale = math.sqrt(state.advantage_sq)
    return adv / scale, scale


@dataclass
class Timings:
    forward_s: float = 0.0  # forward passes (the batches' losses)
    mask_s: float = 0.0  # mask sampling, set_masks, score and logits update
    heldout_s: float = 0.0  # held-out evaluation of the current final mask

    @property
    def mask_share(self) -> float:
        total = self.forward_s + self.mask_s
        return self.mask_s / total if total else 0.0

    @property
    def heldout_share(self) -> float:
        total = self.forward_s + self.mask_s + self.heldout_s
        return self.heldout_s / total if total else 0.0


class MaskTrainer:
    """The update loop, generic over how a batch's loss is measured.

    ``model`` carries (or gets) the initial masks on every masked layer; each update samples
    ``config.samples`` masks of the trained layers, swaps each in with :func:`set_masks`, measures
    ``batch_loss(b)`` on ``accumulation`` consecutive batches of the wrapping stream, and moves the
    logits by :func:`advantages` (see the module docstring).

    ``heldout_loss(b)`` (with ``heldout_batches`` batches) scores a mask on the held-out set; with
    it, the current final mask is scored every ``eval_every`` updates (0 = only before and after).

    A loss callable with a ``losses(indices)`` method (:class:`maskdm.method.replay.ReplayedLosses`) is
    asked for a whole window at once, so it can evaluate several batches per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        initial_masks: Mapping[str, torch.Tensor],
        policy: MaskPolicy,
        batch_loss: Callable[[int], float],
        baseline: np.ndarray,
        config: TrainConfig,
        state: TrainState | None = None,
        heldout_loss: Callable[[int], float] | None = None,
        heldout_batches: int = 0,
        eval_every: int = 0,
    ):
        self.model = model
        # Copies: the model's mask buffers are rewritten every update and may alias the caller's tensors.
        self.initial = {k: v.detach().clone() for k, v in initial_masks.items()}
        self.policy = policy
        self.batch_loss = batch_loss
        self.baseline = np.asarray(baseline, dtype=np.float64)
        self.config = config
        self.state = state or TrainState()
        self.heldout_loss = heldout_loss
        self.heldout_batches = int(heldout_batches) if heldout_loss is not None else 0
        self.eval_every = int(eval_every)
        if eval_every < 0:
            raise MaskDMError(f"eval_every must be 0 (only before and after) or positive, not {eval_every}")
        self.history: list[UpdateMetrics] = []
        self.heldout_history: list[HeldoutPoint] = []
        self._initial_heldout: np.ndarray | None = None
        self.timings = Timings()
        ensure_masks(model, self.initial)
        self.device = next(model.parameters()).device
        self.policy.to(self.device)
        trained = set(policy.names)
        self._total_entries = sum(m.numel() for m in self.initial.values())
        self._fixed_kept = sum(int(m.sum()) for k, m in self.initial.items() if k not in trained)

    @property
    def num_batches(self) -> int:
        return len(self.baseline)

    def total_updates(self) -> int:
        return planned_updates(self.num_batches, self.config)

    def run(
        self,
        on_update: Callable[[UpdateMetrics], None] | None = None,
        progress: bool = True,
        on_heldout: Callable[[HeldoutPoint], None] | None = None,
    ) -> list[UpdateMetrics]:
        """Run the remaining updates (from ``state.updates``); ``on_update`` gets each update's
        metrics and ``on_heldout`` each held-out score of the final mask."""
        total = self.total_updates()
        self.model.eval()

        def score_final() -> None:
            final = self.policy.final_masks()
            losses = self.heldout(final)
            if self._initial_heldout is None and all(torch.equal(m, self.initial[k].to(m.device)) for k, m in final.items()):
                self._initial_heldout = losses  # the final mask is still the initial one: no need to score it twice
            point = HeldoutPoint(self.state.updates, float(np.mean(losses)), losses)
            self.heldout_history.append(point)
            if on_heldout is not None:
                on_heldout(point)

        if self.heldout_batches:
            score_final()
        bar = tqdm(total=total, initial=min(self.state.updates, total), desc="train_masks", unit="update", disable=not progress)
        with bar:
            while self.state.updates < total:
                metrics = self.update()
                self.history.append(metrics)
                bar.update(1)
                bar.set_postfix(improvement=f"{metrics.improvement:.2e}", flips=f"{metrics.mask_flip_rate:.2e}")
                if on_update is not None:
                    on_update(metrics)
                if self.heldout_batches and self.eval_every and self.state.updates % self.eval_every == 0:
                    score_final()
        if self.heldout_batches and self.heldout_history[-1].step != self.state.updates:
            score_final()
        return self.history

    @torch.no_grad()
    def heldout(self, masks: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Per-batch held-out losses of ``masks`` (the trained layers'; the others keep their initial mask)."""
        if not self.heldout_batches:
            raise MaskDMError("no held-out set was given to the trainer")
        start = time.perf_counter()
        set_masks(self.model, {**self.initial, **masks})
        losses = _losses_of(self.heldout_loss, range(self.heldout_batches))
        self.timings.heldout_s += time.perf_counter() - start
        return losses

    def heldout_result(self) -> HeldoutResult:
        """Initial against final mask on the held-out set, batch by batch (reusing the scores
        :meth:`run` already made where they are of the same masks)."""
        if self._initial_heldout is None:
            self._initial_heldout = self.heldout(self.initial)
        last = self.heldout_history[-1] if self.heldout_history else None
        final = last.losses if last is not None and last.step == self.state.updates else self.heldout(self.policy.final_masks())
        return HeldoutResult(initial=self._initial_heldout, final=final)

    @torch.no_grad()
    def update(self) -> UpdateMetrics:
        cfg = self.config
        first = self.state.updates * cfg.accumulation
        window = [(first + i) % self.num_batches for i in range(cfg.accumulation)]
        baseline = float(np.mean(self.baseline[window]))

        sampled, losses = [], []
        for k in range(cfg.samples):
            start = time.perf_counter()
            mask = self.policy.sample_flat(mask_generator(cfg.seed, self.state.updates, self.device, k))
            set_masks(self.model, self.policy.unflatten(mask))
            self._sync()  # so that the timings below split mask work from forward passes on a GPU too
            self.timings.mask_s += time.perf_counter() - start
            start = time.perf_counter()
            losses.append(float(np.mean(_losses_of(self.batch_loss, window))))
            self.timings.forward_s += time.perf_counter() - start
            sampled.append(mask)

        start = time.perf_counter()
        adv, scale = advantages(np.array(losses) - baseline, cfg, self.state)
        if cfg.lr != 0:
            for mask, a in zip(sampled, adv):
                self.policy.step(mask, cfg.lr * float(a) / cfg.samples)
        flips, kept = self._mask_stats(sampled[0])
        self.timings.mask_s += time.perf_counter() - start

        self.state.updates += 1
        loss = float(np.mean(losses))
        return UpdateMetrics(
            step=self.state.updates,
            epoch=self.state.updates * cfg.accumulation / self.num_batches,
            loss=loss,
            baseline_loss=baseline,
            improvement=baseline - loss,
            delta=self.state.delta,
            mask_flip_rate=flips / self._total_entries,
            sparsity=1.0 - kept / self._total_entries,
            advantage_scale=scale,
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _mask_stats(self, sampled: torch.Tensor) -> tuple[int, int]:
        # Untrained layers keep their initial masks: no flips, a fixed kept count.
        flips = int((sampled != self.policy.flat_initial).sum())
        return flips, self._fixed_kept + int(sampled.sum())

    def final_masks(self) -> dict[str, torch.Tensor]:
        """The learned masks of every masked layer (untrained ones keep their initial mask), on the CPU."""
        learned = {k: v.cpu() for k, v in self.policy.final_masks().items()}
        return {name: learned.get(name, mask.cpu()) for name, mask in self.initial.items()}


def _losses_of(loss: Callable[[int], float], indices) -> np.ndarray:
    """The losses of batches ``indices``: in one call where ``loss`` takes several (``losses``), else one by one."""
    many = getattr(loss, "losses", None)
    if many is not None:
        return np.asarray(many(list(indices)), dtype=np.float64)
    return np.array([loss(b) for b in indices], dtype=np.float64)


# --- files ---------------------------------------------------------------------------------------


def save_logits(
    path: str | os.PathLike, policy: MaskPolicy, state: TrainState, pattern: str, extra: Mapping[str, object] | None = None
) -> None:
    """logits.safetensors: float32 logits shaped like each trained layer's weight, keyed by module name;
    the metadata holds the format, pattern, update count and delta needed to continue."""
    metadata = {
        "format": LOGITS_FORMAT,
        "pattern": str(pattern),
        "updates": str(state.updates),
        "delta": repr(float(state.delta)),
        "advantage_sq": repr(float(state.advantage_sq)),
        **{k: str(v) for k, v in (extra or {}).items()},
    }
    save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in policy.logits.items()}, str(path), metadata)


def load_logits(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], TrainState, dict[str, str]]:
    """The logits, training state and metadata of a logits.safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        logits = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a corrupt or foreign file
        raise MaskDMError(f"cannot read logits file {path}: {exc}") from None
    if metadata.get("format") != LOGITS_FORMAT:
        raise MaskDMError(f"{path} is not a MaskDM logits file (format {metadata.get('format')!r})")
    state = TrainState(
        updates=int(metadata["updates"]), delta=float(metadata["delta"]), advantage_sq=float(metadata.get("advantage_sq", 0.0))
    )
    return logits, state, metadata


def plot_training_curves(
    history: Sequence[UpdateMetrics], path: str | os.PathLike, heldout: Sequence[HeldoutPoint] = ()
) -> None:
    """training_curves.png: loss vs baseline, improvement and delta, flip rate and sparsity per
    update, and the held-out loss of the final mask where it was scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h.step for h in history]
    fig, axes = plt.subplots(2, 3, figsize=(16, 7))
    axes[0, 0].plot(steps, [h.loss for h in history], label="loss (sampled mask)")
    axes[0, 0].plot(steps, [h.baseline_loss for h in history], label="baseline (initial mask)", alpha=0.7)
    axes[0, 0].set_title("loss on the replayed batches")
    axes[0, 0].legend()
    improvement = np.array([h.improvement for h in history])
    axes[0, 1].plot(steps, improvement, alpha=0.4, label="improvement")
    window = max(1, len(improvement) // 20)
    if window > 1:
        smooth = np.convolve(improvement, np.ones(window) / window, mode="valid")
        axes[0, 1].plot(steps[window - 1 :], smooth, label=f"moving mean ({window})")
    axes[0, 1].axhline(0.0, color="grey", lw=0.8)
    axes[0, 1].set_title("improvement = baseline - loss")
    axes[0, 1].legend()
    axes[1, 0].plot(steps, [h.delta for h in history])
    axes[1, 0].set_title("delta (moving reward baseline)")
    axes[1, 1].plot(steps, [h.mask_flip_rate for h in history], label="mask_flip_rate")
    axes[1, 1].plot(steps, [h.sparsity for h in history], label="sparsity")
    axes[1, 1].set_title("sampled mask")
    axes[1, 1].legend()
    if heldout:
        axes[0, 2].plot([h.step for h in heldout], [h.loss for h in heldout], marker="o", label="final mask")
        axes[0, 2].axhline(heldout[0].loss, color="grey", lw=0.8, ls="--", label="initial mask")
        axes[0, 2].legend()
    axes[0, 2].set_title("held-out loss of the final mask")
    axes[1, 2].plot(steps, [h.advantage_scale for h in history])
    axes[1, 2].set_title("advantage scale (normalize)")
    for ax in axes.flat:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_flip_rates(initial: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, the share of its mask entries that differ from the initial mask."""
    return {name: float((current[name].cpu() != mask.cpu()).float().mean()) for name, mask in initial.items()}


def plot_layer_flips(
    initial: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], path: str | os.PathLike, step: int
) -> Path:
    """A bar per masked layer: the share of its weights whose mask the learned (final) mask flipped
    against the initial one, at update ``step``. Logged at each step, it shows where mask
    learning changes the network as it trains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = layer_flip_rates(initial, current)
    names = list(rates)
    total = sum(int((current[n].cpu() != initial[n].cpu()).sum()) for n in names)
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.22 * len(names)))
    ax.barh(range(len(names)), [100 * rates[n] for n in names], color="tab:orange")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()  # the network's order from the top
    ax.set_xlabel("mask entries flipped vs the initial mask (%)")
    ax.set_title(f"update {step}: {total} flips in all")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


__all__ = [
    "BernoulliPolicy",
    "DELTA_DECAY",
    "HeldoutPoint",
    "HeldoutResult",
    "INIT_CHOICES",
    "LOGITS_FORMAT",
    "MAX_EXACT_N",
    "MaskPolicy",
    "MaskTrainer",
    "NMPattern",
    "NMPolicy",
    "REPLAY_PROTOCOL_VERSION",
    "REWARD_BASELINES",
    "ReplayBatches",
    "ReplayedLosses",
    "ReplaySpec",
    "TARGET_CHOICES",
    "TrainConfig",
    "TrainState",
    "UpdateMetrics",
    "advantages",
    "auto_eval_every",
    "auto_forward_batches",
    "check_forward_batches",
    "heldout_scores",
    "baseline_summary",
    "bernoulli_sample",
    "bernoulli_score",
    "check_nm_masks",
    "check_protocol",
    "compute_baseline_losses",
    "count_batches",
    "ensure_masks",
    "gumbel_top_n",
    "heldout_batches",
    "load_logits",
    "magnitude_logits",
    "make_policy",
    "mask_generator",
    "nm_log_prob",
    "nm_score",
    "parse_pattern",
    "planned_updates",
    "layer_flip_rates",
    "plot_layer_flips",
    "plot_training_curves",
    "replay_model",
    "replay_settings",
    "replayed_loss",
    "resolve_from_baseline",
    "save_logits",
    "select_targets",
    "subset_indices",
    "top_entries",
    "trainable_layers",
]

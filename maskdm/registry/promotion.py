"""Registering a candidate (one version per finetune run, found by a registry filter) and moving
the alias: the version tags, the protocol gate and :func:`decide`'s rules."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from maskdm.errors import MaskDMError
from maskdm.registry.candidates import Candidate, Scoring
from maskdm.registry.pyfunc import (
    DEFAULT_MAX_IMAGE_STEPS, FINETUNE_RUN_TAG, KERNEL_TAG, MAX_IMAGE_STEPS_TAG, RESERVED_ALIASES,
    check_max_image_steps, log_pyfunc_model,
)
from maskdm.report import UNRECORDED, FidProtocol, describe_protocol
from maskdm.tracking import get_upstream


# --------------------------------------------------------------------------------------------
# Registering and the alias


def check_names(registered_model: str, alias: str) -> None:
    if not registered_model.strip():
        raise MaskDMError("registered_model must not be empty")
    alias = alias.strip()
    # MLflow reserves these: 'latest' and v<number> name versions, not aliases.
    if not alias or alias.lower() in RESERVED_ALIASES or (alias[:1] in "vV" and alias[1:].isdigit()):
        raise MaskDMError(f"alias '{alias}' is not allowed: it must be non-empty, not 'latest' and not v<number>")


PROTOCOL_TAG_SUFFIX = ".protocol"
PROTOCOL_ID_TAG_SUFFIX = ".protocol_id"


def version_tags(candidate: Candidate, scoring: Scoring, promote_run_id: str | None = None) -> dict[str, str]:
    """The tags a version carries: its FIDs (with protocols), sparsity, the lineage params and run IDs.

    ``<metric>`` = value, ``<metric>.protocol`` = the protocol's key and ``<metric>.protocol_id`` its
    id: ``scoring``'s score for its metric, the newest score for each other metric of the run.
    """
    chosen = candidate.score(scoring)
    tags = {}
    for metric, score in {**candidate.newest_per_metric(), scoring.metric: chosen}.items():
        tags[metric] = repr(score.value)
        tags[metric + PROTOCOL_TAG_SUFFIX] = score.protocol.key if score.protocol else UNRECORDED
        tags[metric + PROTOCOL_ID_TAG_SUFFIX] = score.protocol_id
    tags.update({
        FINETUNE_RUN_TAG: candidate.run_id,
        "fid_run_id": chosen.fid_run_id,
        "sample_run_id": chosen.sample_run_id or "",
        "mask_training": "true" if "train_masks" in candidate.lineage else "false",
        # A replicate-k FID is tagged with replicate 0's protocol (its seed minus k): the one it compares under.
        "replicate": str(chosen.replicate),
    })
    if candidate.sparsity is not None:
        tags["sparsity"] = repr(candidate.sparsity)
    for key in ("pruning_ratio", "pruner", "pattern", "model", "dataset"):
        if key in candidate.params:
            tags[key] = candidate.params[key]
    for stage, run_id in candidate.lineage.items():
        if stage != "finetune":
            tags[f"{stage}_run_id"] = run_id
    if promote_run_id:
        tags["promote_run_id"] = promote_run_id
    return tags


def _registry_error(exc: MlflowException) -> MaskDMError:
    return MaskDMError(f"model registry: {' '.join(str(exc.message).split())}")


def find_version(registered_model: str, finetune_run_id: str):
    """The (oldest) version of ``registered_model`` tagged with this finetune run, or None.

    The registry does the filtering (name and tag in one ``search_model_versions`` query)."""
    query = f"name = {_filter_literal(registered_model)} and tags.`{FINETUNE_RUN_TAG}` = {_filter_literal(finetune_run_id)}"
    try:
        versions = mlflow.MlflowClient().search_model_versions(query)
    except MlflowException:
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter. The filter grammar has no escape
    character (``'a\\'b'`` matches nothing): a value holding one kind of quote is written in the other."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise MaskDMError(f"registered_model '{value}' holds both ' and \": the model registry cannot search for it; rename it")


def register(
    candidate: Candidate, registered_model: str, scoring: Scoring, promote_run_id: str | None = None,
    max_image_steps: int | None = None, kernel: str | None = None,
):
    """``(ModelVersion, created)``: the version holding ``candidate``, registered if there is none.

    An existing version gets its FID tags refreshed (a newer fid run may have scored the run) and
    nothing else: no second version, no second logged model. Needs an active run to log into.
    ``max_image_steps`` (default :data:`DEFAULT_MAX_IMAGE_STEPS`) is fixed when a version is
    registered: given for an existing version with another cap, it is an error. So is ``kernel``
    (default ``dense``; ``semi_structured``: the served model runs 2:4 layers with sparse kernels).
    """
    client = mlflow.MlflowClient()
    tags = version_tags(candidate, scoring, promote_run_id)
    existing = find_version(registered_model, candidate.run_id)
    cap = DEFAULT_MAX_IMAGE_STEPS if max_image_steps is None else check_max_image_steps(max_image_steps)
    tags[MAX_IMAGE_STEPS_TAG] = str(cap)
    tags[KERNEL_TAG] = kernel or "dense"
    try:
        if existing is not None:
            _check_same_cap(registered_model, existing, max_image_steps)
            held = existing.tags.get(KERNEL_TAG, "dense")
            if kernel is not None and held != kernel:
                raise MaskDMError(
                    f"{registered_model} version {existing.version} holds this run with kernel={held}, fixed when it "
                    f"was registered; kernel={kernel} would need another version: register under another name"
                )
            metrics = {score.metric for score in candidate.fids.values()}
            fid_keys = [k for k in tags if k.split(".")[0] in metrics] + ["fid_run_id", "sample_run_id"]
            for key in fid_keys:
                client.set_model_version_tag(registered_model, existing.version, key, tags[key])
            return client.get_model_version(registered_model, existing.version), False
        with tempfile.TemporaryDirectory(prefix="maskdm-promote-") as tmp:
            up = get_upstream(candidate.run_id, ["finetune"], "model", "finetune_run_id")
            info = log_pyfunc_model(up.download("model", tmp), max_image_steps=cap, kernel=kernel or "dense")
        return mlflow.register_model(info.model_uri, registered_model, tags=tags), True
    except MlflowException as exc:
        raise _registry_error(exc) from None


def _check_same_cap(registered_model: str, existing, max_image_steps: int | None) -> None:
    """An explicit ``max_image_steps`` must be the existing version's: a logged model cannot change."""
    if max_image_steps is None:
        return
    held = existing.tags.get(MAX_IMAGE_STEPS_TAG)
    if held != str(check_max_image_steps(max_image_steps)):
        raise MaskDMError(
            f"{registered_model} version {existing.version} already holds finetune run {existing.tags.get(FINETUNE_RUN_TAG)} "
            f"with max_image_steps {held or 'unset (registered before the cap existed: no cap)'}; a version's cap is "
            f"fixed when it is registered: pass another registered_model to serve this run with max_image_steps {max_image_steps}"
        )


@dataclass(frozen=True)
class Holder:
    """The version an alias points at, its FID tag for the metric compared, and that FID's protocol."""

    version: str
    fid: float | None
    protocol_key: str | None = None
    protocol_id: str | None = None


def alias_holder(registered_model: str, alias: str, metric: str) -> Holder | None:
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(registered_model, alias)
    except MlflowException:
        return None
    try:
        fid = float(version.tags[metric])
    except (KeyError, ValueError):
        fid = None
    return Holder(
        str(version.version), fid, version.tags.get(metric + PROTOCOL_TAG_SUFFIX), version.tags.get(metric + PROTOCOL_ID_TAG_SUFFIX)
    )


def protocol_conflict(scoring: Scoring, holder: Holder) -> str | None:
    """Why ``scoring``'s FID and the holder's do not compare; None when they do, or when the holder
    has no FID for the metric (then :func:`decide`'s rule 4 applies). A protocol that was not
    recorded matches none, itself included."""
    if holder.fid is None:
        return None
    if scoring.protocol is not None and holder.protocol_id == scoring.protocol_id:
        return None
    theirs = FidProtocol.parse(holder.protocol_key)
    if scoring.protocol is None or theirs is None:
        return (
            f"version {holder.version}'s {scoring.metric} and this run's were not both measured under a recorded FID "
            f"protocol (this run: {describe_protocol(scoring.protocol)}; version {holder.version}: "
            f"{describe_protocol(theirs)}), so they do not compare; pass force=true to promote anyway"
        )
    differences = ", ".join(f"{part} {mine} vs {other}" for part, mine, other in scoring.protocol.differences(theirs))
    return (
        f"version {holder.version}'s {scoring.metric} was measured under another FID protocol "
        f"({theirs.id}, this run's is {scoring.protocol.id}; they differ in {differences}, this run vs version "
        f"{holder.version}), so the two do not compare: score this run under that protocol, or pass force=true"
    )


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    fid: float, metric: str, version: str, holder: Holder | None, max_fid: float | None = None, force: bool = False
) -> Decision:
    """Whether the alias moves to ``version`` (FID ``fid``): the promote rules, in order.

    1. ``max_fid`` given and ``fid > max_fid``: no (force does not lift an explicit bound).
    2. Nobody holds the alias, or ``version`` already does: yes.
    3. ``force``: yes.
    4. The holder has no ``metric`` tag: no (nothing to compare with).
    5. Yes if ``fid <= holder.fid`` (no worse), else no.
    """
    if max_fid is not None and fid > max_fid:
        return Decision(False, f"{metric} {fid:.4g} is above max_fid {max_fid:g}")
    if holder is None:
        return Decision(True, "nobody held the alias")
    if holder.version == version:
        return Decision(True, "it already held the alias")
    if force:
        return Decision(True, f"force (version {holder.version} had {metric} {_show(holder.fid)})")
    if holder.fid is None:
        return Decision(
            False, f"version {holder.version} holds the alias and has no '{metric}' tag to compare with; pass force=true"
        )
    if fid <= holder.fid:
        return Decision(True, f"{metric} {fid:.4g} is no worse than version {holder.version}'s {holder.fid:.4g}")
    return Decision(
        False, f"{metric} {fid:.4g} is worse than version {holder.version}'s {holder.fid:.4g}; pass force=true to promote anyway"
    )


def _show(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def set_alias(registered_model: str, alias: str, version: str) -> None:
    try:
        mlflow.MlflowClient().set_registered_model_alias(registered_model, alias, version)
    except MlflowException as exc:
        raise _registry_error(exc) from None

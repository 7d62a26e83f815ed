"""FID protocols: what two FID scores must share to be compared, and what their metrics are named.

A fid run records its protocol (:class:`FidProtocol`) as tags; the report, promote and the fid stage
read them back from here. Its own module because three modules use it and none of them owns it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

#: The metric name of Inception pool3 FID, the field's FID.
FID_METRIC = "fid"

#: ``<fid metric>_se``: the fid stage's bootstrap standard error of that FID (docs/details/fid.md).
SE_SUFFIX = "_se"

_FID_METRIC_NAME = re.compile(r"^fid(_[A-Za-z0-9_]+)?$")


def is_fid_metric(name: str) -> bool:
    """``fid`` and ``fid_<feature extractor>``; ``fid_*_s`` (timings), ``fid_*_id`` and ``<fid>_se``
    (the standard error a fid run logs beside its FID) are not FIDs."""
    return bool(_FID_METRIC_NAME.match(name)) and not name.endswith(("_s", "_id", SE_SUFFIX))


# --------------------------------------------------------------------------------------------
# FID protocols: what must match for two FIDs to be compared

#: Tags of a fid run: the protocol as ``part=value;...`` (readable, filterable with LIKE), its short
#: digest, and each part on its own (``maskdm.fid_protocol.<part>``).
FID_PROTOCOL_TAG = "maskdm.fid_protocol"
FID_PROTOCOL_ID_TAG = "maskdm.fid_protocol_id"
FID_PROTOCOL_PART_PREFIX = "maskdm.fid_protocol."
#: The parts of a protocol, in the order of its key.
PROTOCOL_PARTS = (
    "features", "dims", "samples", "reference", "resolution", "weights",
    "sampler", "steps", "skip", "eta", "clip", "seed",
)
#: The protocol id of fid runs made before protocols were recorded.
UNRECORDED = "unrecorded"
UNKNOWN = "unknown"
#: Inception pool3: the field's FID, the only protocol whose metric is named ``fid``.
FID_FEATURES, FID_DIMS = "inception", 2048


def fid_metric_name(features: str, dims: int | str) -> str:
    """``fid`` for Inception pool3 (2048), ``fid_inception_<dims>`` for other Inception features, else ``fid_<features>``."""
    if features == FID_FEATURES:
        return FID_METRIC if int(dims) == FID_DIMS else f"fid_inception_{int(dims)}"
    return f"fid_{features}"


def _part_value(value: object) -> str:
    text = UNKNOWN if value is None or str(value).strip() == "" else str(value).strip()
    return text.replace(";", "%3B")  # ';' separates the parts of a key


@dataclass(frozen=True)
class FidProtocol:
    """Everything two FIDs must share to be compared: feature extractor and size, number of samples,
    reference statistics (``<dataset>:train``, or ``sha256:<digest>`` of a stats file) and their
    resolution, the feature weights' digest, and how the samples were drawn (sampler, steps, skip
    type, eta, x0 clipping, seed). ``unknown`` marks a part the runs did not record."""

    parts: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, **parts: object) -> "FidProtocol":
        missing = [p for p in PROTOCOL_PARTS if p not in parts]
        extra = [p for p in parts if p not in PROTOCOL_PARTS]
        if missing or extra:
            raise ValueError(f"FID protocol parts: missing {missing}, unexpected {extra}")
        return cls(tuple((p, _part_value(parts[p])) for p in PROTOCOL_PARTS))

    @classmethod
    def parse(cls, key: str | None) -> "FidProtocol | None":
        """The protocol of a :attr:`key`; None for an empty or malformed one."""
        if not key or not str(key).strip():
            return None
        parts = dict(item.partition("=")[::2] for item in str(key).split(";"))
        if set(parts) != set(PROTOCOL_PARTS):
            return None
        return cls(tuple((p, parts[p]) for p in PROTOCOL_PARTS))

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "FidProtocol | None":
        return cls.parse(tags.get(FID_PROTOCOL_TAG))

    def get(self, part: str) -> str:
        return dict(self.parts)[part]

    @property
    def key(self) -> str:
        return ";".join(f"{part}={value}" for part, value in self.parts)

    @property
    def id(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:10]

    @property
    def metric(self) -> str:
        return fid_metric_name(self.get("features"), self.get("dims"))

    def tags(self) -> dict[str, str]:
        tags = {FID_PROTOCOL_TAG: self.key, FID_PROTOCOL_ID_TAG: self.id}
        tags.update({FID_PROTOCOL_PART_PREFIX + part: value for part, value in self.parts})
        return tags

    def differences(self, other: "FidProtocol | None") -> list[tuple[str, str, str]]:
        """``(part, this value, other value)`` for every part that differs (all of them against None)."""
        theirs = dict(other.parts) if other else {}
        return [(p, v, theirs.get(p, UNRECORDED)) for p, v in self.parts if theirs.get(p) != v]


def describe_protocol(protocol: "FidProtocol | None") -> str:
    return f"{protocol.id} ({protocol.key})" if protocol else f"{UNRECORDED} (fid runs made before protocols were recorded)"

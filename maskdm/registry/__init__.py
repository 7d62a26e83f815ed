"""The MLflow Model Registry side of MaskDM: a finetuned model as a pyfunc image generator.

A registered version is a pyfunc model logged from code (:data:`MODEL_CODE`, so loading it
unpickles nothing) whose artifact ``pipeline`` is the finetune run's diffusers pipeline folder with
its weights stored sparse (``unet/diffusion_pytorch_model.sparse.safetensors``: kept values plus a
bitmask, :mod:`maskdm.ddpm.sparse_storage`; ``load_context`` rebuilds the dense UNet bit for bit, and
``python -m maskdm.ddpm.sparse_storage export <pipeline> <out>`` writes a dense diffusers folder) and
whose ``code/`` holds a copy of this ``maskdm`` package, so it loads wherever its pip requirements
are installed, with the code that registered it. ``predict`` takes a DataFrame with integer
columns ``num_images`` and, optionally, ``ddim_steps`` (default 100) and ``seed`` (default 42), one
row per request, and returns one uint8 NHWC array: the images of all rows, in row order (row
``i``'s images are those ``sample --seed <seed> --ddim_steps <ddim_steps>`` makes as its first
``num_images`` images). One call may ask for at most ``max_image_steps`` image-steps (num_images x
the DDIM steps each row runs, summed over its rows; :data:`DEFAULT_MAX_IMAGE_STEPS` unless set when registering), so
a served request cannot hold the server for hours.

Versions are keyed by the finetune run they hold (version tag ``finetune_run_id``), so registering
a run twice gives the same version. A promote ranks and compares by one FID metric under one FID
protocol (:class:`Scoring`, chosen by :func:`choose_scoring`); each FID tag of a version comes with
its protocol (``<metric>.protocol``, ``<metric>.protocol_id``), and a holder scored under another
protocol is not compared with (:func:`protocol_conflict`). Replicates of a sweep (``main --seeds``)
sample with seed + k: their FIDs compare under replicate 0's protocol, as the report's columns do
(``ModelScores.comparable``; the version's tag ``replicate`` says which one it holds). Whether the alias moves is
:func:`decide`'s pure rule.

The package, one job per module, each importing only those before it: :mod:`~maskdm.registry.pyfunc`
(the registered model), :mod:`~maskdm.registry.candidates` (which run, judged by which FID) and
:mod:`~maskdm.registry.promotion` (versions, tags and the alias). Every public name is importable
from ``maskdm.registry`` (a registered version's code imports ``maskdm.registry.DDPMImageGenerator``).
"""

from maskdm.registry.pyfunc import (  # noqa: F401 (the registry's public names)
    COLUMN_DEFAULTS, DEFAULT_MAX_IMAGE_STEPS, DEFAULT_MODEL_CONFIG, FINETUNE_RUN_TAG, INPUT_COLUMNS,
    KERNEL_TAG, MAX_IMAGE_STEPS_TAG, MODEL_CODE, PIPELINE_ARTIFACT, REQUIREMENTS, RESERVED_ALIASES,
    BadRequest, DDPMImageGenerator, GenerationRequest, check_budget, check_max_image_steps, generate,
    generation_signature, input_example, log_pyfunc_model, parse_requests, pinned_requirements,
    resolve_device, steps_run,
)
from maskdm.registry.candidates import (  # noqa: F401 (the registry's public names)
    AUTO, Candidate, Scoring, best_candidate, candidate, check_metric, check_protocol, choose_scoring,
    fid_scores,
)
from maskdm.registry.promotion import (  # noqa: F401 (the registry's public names)
    PROTOCOL_ID_TAG_SUFFIX, PROTOCOL_TAG_SUFFIX, Decision, Holder, alias_holder, check_names, decide,
    find_version, protocol_conflict, register, set_alias, version_tags,
)
from maskdm.registry.promotion import _check_same_cap  # noqa: F401 (tests call it)

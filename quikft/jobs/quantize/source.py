"""The model a quantize job reads, and its identity.

The model is never loaded whole when it can stream: its skeleton is built on the meta device and each
decoder block is read from the checkpoint's safetensors shards when its turn comes
(:mod:`quikft.jobs.quantize.weights`). A checkpoint that cannot stream (no safetensors files, or tensor
names no conversion maps) is loaded whole instead, and the report says so. The fingerprint is what a
resumed run must match (:mod:`quikft.jobs.quantize.state`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quikft import arch
from quikft.config import QuantizeJob
from quikft.hardware import resolve_device
from quikft.jobs.quantize.weights import CheckpointWeights, local_checkpoint
from quikft.models import load_model, load_tokenizer, resolve_model
from quikft.runinfo import library_versions

# Job settings that do not change the output tensors (a resumed run may differ in them).
# "model" as spelled (an alias, a relative path) is not the model: model_path (resolved) and the
# weights' identity are.
NOT_FINGERPRINTED = ("out", "overwrite", "resume", "offload_activations", "device", "model")


@dataclass
class ModelSource:
    """The model a job quantizes: the model (a meta skeleton when it streams), its tokenizer, the
    checkpoint its blocks stream from (None: the whole model is in memory), how it was loaded (for
    the report) and, once prepared, where its blocks and layers are."""

    model: nn.Module
    tokenizer: Any
    weights: CheckpointWeights | None
    loading: str
    layout: arch.ModelLayout | None = None


def open_model(job: QuantizeJob) -> ModelSource:
    """A meta skeleton plus the checkpoint to stream blocks from, or (when the checkpoint cannot
    stream) the whole model in float32 and no checkpoint."""
    path = resolve_model(job.model)
    local = local_checkpoint(path)
    weights, reason = None, "no local safetensors checkpoint"
    if local is not None:
        try:
            weights = CheckpointWeights(local)
        except ValueError as err:  # no safetensors files (e.g. .bin only)
            reason = str(err)
    if weights is not None:
        model = weights.skeleton(job.trust_remote_code)
        unmatched = weights.plan(model)
        if not unmatched:
            return ModelSource(model, load_tokenizer(job.model, job.trust_remote_code), weights,
                               "streamed block by block")
        reason = f"no stored tensor (under any name transformers maps) provides {unmatched[0]}"
    model, tokenizer = load_model(job.model, dtype=torch.float32, device="cpu", trust_remote_code=job.trust_remote_code)
    return ModelSource(model, tokenizer, None, f"whole model in memory: {reason}")


def fingerprint(job: QuantizeJob, weights: CheckpointWeights | None) -> dict:
    """Everything that changes the output tensors: settings, the model's identity, the libraries."""
    settings = {key: value for key, value in job.to_dict().items() if key not in NOT_FINGERPRINTED}
    path = Path(resolve_model(job.model))
    config_file = path / "config.json"
    identity = hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.is_file() else str(path)
    versions = library_versions()
    return {**json.loads(json.dumps(settings, default=str)), "model_path": str(path.resolve()),
            "model_config_sha256": identity, "model_bytes": weights.nbytes if weights else None,
            "model_weights": weights.identity() if weights else None,
            "device_type": torch.device(resolve_device(job.device)).type, "threads": torch.get_num_threads(),
            "torch": versions["torch"], "transformers": versions["transformers"]}

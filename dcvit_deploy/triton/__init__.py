"""Triton Inference Server: model configs and model repositories.

* :mod:`.model_config` -- an artifact's I/O, Triton's ``ModelConfig`` built from it, and the
  validation of a config read back against the rules Triton applies when loading.
* :mod:`.runtime` -- the runtime settings a target profile measured with, as config settings.
* :mod:`.repository` -- :func:`publish` (numbered versions of one model, idempotent, atomic,
  owned) and :func:`unpublish` (a run's own versions).

Importing this package imports neither onnx nor tritonclient (both are loaded on first use).
"""

from __future__ import annotations

from dcvit_deploy.triton.model_config import (
    Accelerator,
    ModelIO,
    NotServable,
    TensorSpec,
    engine_meta_path,
    parse_config,
    platform_for,
    read_engine_io,
    read_onnx_io,
    version_dirs,
)
from dcvit_deploy.triton.repository import (
    Published,
    RepositoryConflict,
    default_model_name,
    publish,
    unpublish,
)
from dcvit_deploy.triton.runtime import (
    ServingMismatch,
    ServingSettings,
    serving_settings,
)

__all__ = [
    "Accelerator",
    "ModelIO",
    "NotServable",
    "Published",
    "RepositoryConflict",
    "ServingMismatch",
    "ServingSettings",
    "TensorSpec",
    "default_model_name",
    "engine_meta_path",
    "parse_config",
    "platform_for",
    "publish",
    "read_engine_io",
    "read_onnx_io",
    "serving_settings",
    "unpublish",
    "version_dirs",
]

"""Triton Inference Server: model configs and model repositories.

* :mod:`.config` -- an artifact's I/O, the ``config.pbtxt`` text, validation against Triton's
  ``ModelConfig`` schema and the rules Triton applies when loading.
* :mod:`.runtime` -- the runtime settings a target profile measured with, as config settings.
* :mod:`.repository` -- :func:`publish` (numbered versions of one model, idempotent, atomic),
  :func:`clear_stale` (a run's own stale models) and the single-version
  :func:`write_model_repository`.

Importing this package imports neither onnx nor tritonclient (both are loaded on first use).
"""

from __future__ import annotations

from dcvit_deploy.triton.model_config import (
    Accelerator,
    ConfigCheck,
    ModelIO,
    NotServable,
    TensorSpec,
    engine_meta_path,
    parse_config,
    platform_for,
    read_engine_io,
    read_onnx_io,
    render_config,
    validate_config,
    version_dirs,
)
from dcvit_deploy.triton.repository import (
    Published,
    RepositoryConflict,
    check_model_name,
    clear_stale,
    default_model_name,
    publish,
    write_model_repository,
)
from dcvit_deploy.triton.runtime import (
    ServingMismatch,
    ServingSettings,
    publishable,
    serving_settings,
)

__all__ = [
    "Accelerator",
    "ConfigCheck",
    "ModelIO",
    "NotServable",
    "Published",
    "RepositoryConflict",
    "ServingMismatch",
    "ServingSettings",
    "TensorSpec",
    "check_model_name",
    "clear_stale",
    "default_model_name",
    "engine_meta_path",
    "parse_config",
    "platform_for",
    "publish",
    "publishable",
    "read_engine_io",
    "read_onnx_io",
    "render_config",
    "serving_settings",
    "validate_config",
    "version_dirs",
    "write_model_repository",
]

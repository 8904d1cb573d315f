"""Candidate files: ``<name>.safetensors`` (state dict) + ``<name>.json`` (the Candidate record).

A candidate rebuilds from these two files alone: the base timm model is created without
weights from ``arch.model_name``/``arch.model_kwargs``, reshaped to the spec, and loaded
strictly. No pickled modules.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from dcvit_deploy.errors import UserInputError
from dcvit_deploy.store.atomic import atomic_write_json, atomic_write_with, sha256_file
from dcvit_deploy.store.records import Candidate, from_dict, read_json, to_dict

if TYPE_CHECKING:
    from torch import nn


def save_candidate(
    directory: str | Path, candidate: Candidate, model: nn.Module, stem: str = ""
) -> Candidate:
    """Write weights then spec (atomically) as ``<stem>.safetensors`` / ``<stem>.json`` (default
    stem: the name); returns the candidate with its weights' checksum."""
    from safetensors.torch import save_file

    d = Path(directory)
    weights = d / f"{stem or candidate.name}.safetensors"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_with(weights, lambda tmp: save_file(state, str(tmp)))
    done = replace(candidate, weights=weights.name, weights_sha256=sha256_file(weights))
    atomic_write_json(d / f"{stem or candidate.name}.json", to_dict(done))
    return done


def read_candidate(spec_path: str | Path) -> Candidate:
    """A candidate's ``<name>.json``, checked against :class:`Candidate` on load."""
    data = read_json(spec_path, Candidate, what="candidate spec", fix="re-run compression")
    return from_dict(Candidate, data)


def build_candidate(candidate: Candidate, weights_path: str | Path) -> nn.Module:
    """Rebuild the torch module of ``candidate`` from its spec and weights file (eval mode),
    refusing weights that do not match the spec's checksum."""
    from safetensors.torch import load_file

    from dcvit_deploy.compress.surgery import apply_spec
    from dcvit_deploy.model.loading import create_model

    arch = candidate.arch
    model = apply_spec(create_model(arch.model_name, arch.model_kwargs), arch)
    wp = Path(weights_path)
    if candidate.weights_sha256 and sha256_file(wp) != candidate.weights_sha256:
        raise UserInputError(
            f"weights {wp.name} do not match the checksum in the spec of {candidate.name}",
            "re-run compression for this candidate",
        )
    model.load_state_dict(load_file(str(wp)), strict=True)
    return model.eval()


def load_candidate(spec_path: str | Path) -> tuple[Candidate, nn.Module]:
    """Read ``<name>.json`` and rebuild its module from the weights file next to it."""
    p = Path(spec_path)
    cand = read_candidate(p)
    return cand, build_candidate(cand, p.parent / cand.weights)

"""Load timm plain ViT/DeiT models from local weights and check they are surgery-compatible.

Nothing here downloads: weights come from a local ``.safetensors``/``.pth`` checkpoint, from a
warm local Hugging Face hub cache (``pretrained_cache=True`` forces offline mode), or the model
is random-initialised when the caller says so explicitly.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dcvit_deploy.errors import CheckpointMismatchError, UnsupportedModelError, UserInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model plus the construction kwargs that rebuild it and where weights came from."""

    model: nn.Module
    name: str
    model_kwargs: dict[str, Any]
    weights_source: str
    inferred: dict[str, Any] = field(default_factory=dict)


def parse_model_kwargs(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings the way timm's scripts take ``--model-kwargs``.

    Values are Python literals where they parse (``10``, ``0.1``, ``True``, ``(16, 16)``),
    strings otherwise.
    """
    out: dict[str, Any] = {}
    for item in items:
        for part in item.split():
            if "=" not in part:
                raise UserInputError(
                    f"model kwarg {part!r} is not key=value",
                    "write e.g. --model-kwargs num_classes=10 img_size=224",
                )
            key, raw = part.split("=", 1)
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict (unwrapping common trainer wrappers)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserInputError(
            f"checkpoint {p} does not exist", "pass an existing .safetensors or .pth file"
        )
    if p.suffix not in CHECKPOINT_SUFFIXES:
        raise UserInputError(
            f"checkpoint {p.name} has an unknown suffix {p.suffix!r}",
            f"use one of {', '.join(CHECKPOINT_SUFFIXES)}",
        )
    from timm.models import load_state_dict

    try:  # timm's loader: safetensors or torch (weights only), EMA/trainer wrappers, "module."
        sd: Any = load_state_dict(str(p), use_ema=False, weights_only=True)
    except Exception as exc:  # corrupt or foreign files surface many exception types
        raise _unreadable(p, exc) from exc
    tensors = sd.items() if isinstance(sd, Mapping) else ()
    clean = {k: v for k, v in tensors if isinstance(v, torch.Tensor)}
    if not clean:
        raise UserInputError(f"checkpoint {p.name} holds no state dict", "save model.state_dict()")
    return clean


def _unreadable(path: Path, exc: Exception) -> UserInputError:
    """The one-line error for a checkpoint torch or safetensors cannot read.

    A pickle that ``torch.load(weights_only=True)`` refuses keeps torch's own explanation (the
    ``WeightsUnpickler error`` sentence: which global was refused) in full; it is the part that
    says what is in the file.
    """
    text = _one_line(str(exc))
    cause = _one_line(str(exc.__cause__ or exc.__context__ or ""))  # timm wraps torch's error
    marker = "WeightsUnpickler error:"
    if marker in cause:
        text = cause
    if marker in text:
        explanation = text[text.index(marker) + len(marker) :].strip()
        explanation = explanation.split(" Check the documentation of torch.load")[0].strip()
        return UserInputError(
            f"checkpoint {path.name} holds pickled Python objects besides tensors, which are "
            f"not loaded for safety (torch: {explanation})",
            "re-save only the weights, e.g. torch.save(model.state_dict(), 'w.pth') or "
            "safetensors.torch.save_file(model.state_dict(), 'w.safetensors')",
        )
    if len(text) > 600:
        text = text[:600] + " ..."
    return UserInputError(
        f"cannot read checkpoint {path.name}: {type(exc).__name__}: {text}",
        "pass a torch state dict saved with torch.save or a safetensors file",
    )


def check_finite(sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict holding NaN or infinite values, naming the first such tensor.

    Such weights make every candidate fail verification after minutes of work; this check
    costs one pass over the tensors.
    """
    import torch

    for key, value in sd.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if value.device.type == "meta":
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            kind = "NaN" if bool(torch.isnan(value).any()) else "infinite"
            raise CheckpointMismatchError(
                f"checkpoint {source} has {kind} values: tensor {key!r} "
                f"({bad} of {value.numel()} values are not finite)",
                "use weights saved before training diverged, or re-export the checkpoint",
            )


def infer_kwargs_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer ``num_classes``, ``embed_dim``, ``depth``, ``patch_size`` and ``img_size``.

    Only fields the tensors determine unambiguously are returned.
    """
    out: dict[str, Any] = {}
    head = sd.get("head.weight")
    if head is not None and head.ndim == 2:
        out["num_classes"] = int(head.shape[0])
    elif "head.weight" not in sd and any(k.startswith("blocks.") for k in sd):
        out["num_classes"] = 0
    proj = sd.get("patch_embed.proj.weight")
    if proj is not None and proj.ndim == 4:
        out["embed_dim"] = int(proj.shape[0])
        out["patch_size"] = int(proj.shape[-1])
        out["in_chans"] = int(proj.shape[1])
    depth = {
        int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()
    }
    if depth:
        out["depth"] = max(depth) + 1
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3 and "patch_size" in out:
        prefix = sum(1 for k in ("cls_token", "dist_token") if k in sd)
        if "reg_token" in sd:
            prefix += int(sd["reg_token"].shape[1])
        grid2 = int(pos.shape[1]) - prefix
        side = round(grid2**0.5)
        if side * side == grid2:
            out["img_size"] = side * out["patch_size"]
        elif side * side == int(pos.shape[1]):
            out["img_size"] = side * out["patch_size"]  # pos embed without prefix tokens
    return out


SUPPORTED_MODULES = ("vision_transformer", "deit")
"""timm modules whose models are plain ViT/DeiT candidates (each is still checked when built)."""


def create_model(
    name: str, model_kwargs: Mapping[str, Any] | None = None, *, pretrained: bool = False
) -> nn.Module:
    """``timm.create_model`` with user errors for unknown names and bad kwargs.

    Any error the constructor raises for the given kwargs (``TypeError`` for an unknown name,
    ``AssertionError`` for e.g. ``embed_dim`` not divisible by ``num_heads``) becomes a
    :class:`UserInputError` naming the kwargs. Works inside ``torch.device("meta")`` to check a
    structure without allocating weights.
    """
    import timm

    kwargs = dict(model_kwargs or {})
    if not timm.is_model(name):
        close = supported_model_suggestions(name)
        raise UserInputError(
            f"unknown timm model {name!r}",
            "pick a plain ViT/DeiT name" + (f", e.g. {', '.join(close)}" if close else ""),
        )
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained and not isinstance(exc, (TypeError, AssertionError)):
            raise  # hub/cache errors: the caller words them
        shown = " ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "(none)"
        reason = _one_line(str(exc)) or type(exc).__name__
        raise UserInputError(
            f"timm cannot build {name} with --model-kwargs {shown}: {type(exc).__name__}: {reason}",
            "check the --model-kwargs names and values against the model's constructor "
            "(e.g. embed_dim must be divisible by num_heads)",
        ) from exc


def supported_model_suggestions(name: str, limit: int = 8) -> list[str]:
    """Up to ``limit`` timm model names close to ``name`` that this tool supports.

    Only names from timm's plain ViT/DeiT modules are considered, and each suggestion is built
    on the ``meta`` device (no memory, no download) and passed through :func:`check_supported`,
    so a suggestion is never a model the tool would then refuse.
    """
    import difflib

    import timm
    import torch

    pool = [
        n for n in timm.list_models(module=list(SUPPORTED_MODULES)) if not n.startswith("test_")
    ]
    head = name.split("_")[0]

    def score(candidate: str) -> float:
        same_family = candidate.split("_")[0] == head
        return difflib.SequenceMatcher(None, name, candidate).ratio() + (0.5 if same_family else 0)

    out: list[str] = []
    for candidate in sorted(pool, key=lambda c: (-score(c), c))[: 3 * limit]:
        try:
            # one block is enough to see the block, attention, MLP and head types
            with torch.device("meta"):
                model = timm.create_model(candidate, pretrained=False, depth=1, weight_init="skip")
            check_supported(model, candidate)
        except Exception:  # unsupported or unbuildable here: never suggest it
            continue
        out.append(candidate)
        if len(out) >= limit:
            break
    return out


def create_structure(name: str, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The model's structure on the ``meta`` device: shapes and module types, no memory.

    Plain ViT/DeiT models skip their weight initialisation (slow on ``meta`` and meaningless
    there); errors are those of :func:`create_model`.
    """
    import torch

    kwargs = dict(model_kwargs or {})
    if "weight_init" not in kwargs and _is_supported_family(name):
        kwargs["weight_init"] = "skip"
    with torch.device("meta"):
        return create_model(name, kwargs)


def _is_supported_family(name: str) -> bool:
    from timm.models import is_model, is_model_in_modules

    return bool(is_model(name) and is_model_in_modules(name, SUPPORTED_MODULES))


def _one_line(text: str) -> str:
    """``text`` without ANSI colour codes, on one line (whitespace runs collapsed)."""
    import re

    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def check_supported(model: nn.Module, name: str = "") -> None:
    """Refuse layouts DC-ViT surgery cannot handle, naming the unsupported part.

    Supported: timm ``VisionTransformer`` (incl. DeiT distilled) whose blocks are the standard
    pre-norm ``Block`` with a fused-qkv ``Attention`` and a two-layer ``Mlp`` (any depth, with or
    without cls token, register tokens, LayerScale).
    """
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    label = name or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"{label} is a {type(model).__name__}, not a plain ViT; DC-ViT surgery supports timm "
            "VisionTransformer/DeiT models only (no Swin, hierarchical or hybrid models)",
            "choose a vit_*/deit_* model",
        )
    if not len(model.blocks):
        raise UnsupportedModelError(
            f"{label} with depth=0 has no transformer block to compress", "pass depth >= 1"
        )
    if getattr(model, "global_pool", "") == "map":
        raise UnsupportedModelError(
            f"{label} uses an attention-pooling (MAP) head, which is unsupported",
            "choose a model with token or avg pooling",
        )
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise UnsupportedModelError(
                f"{label} block {i} is {type(blk).__name__}; only timm's pre-norm Block is "
                "supported "
                "(parallel, post-norm and scaled blocks are not)",
                "choose a vit_*/deit_* model with standard blocks",
            )
        if type(blk.attn) is not Attention:
            raise UnsupportedModelError(
                f"{label} block {i} attention is {type(blk.attn).__name__}, not timm Attention",
                "choose a model with standard fused-qkv attention",
            )
        if type(blk.mlp) is not Mlp or not hasattr(blk.mlp, "fc1"):
            raise UnsupportedModelError(
                f"{label} block {i} MLP is {type(blk.mlp).__name__}; "
                "gated/SwiGLU MLPs are unsupported",
                "choose a model with a two-layer GELU Mlp",
            )
        if not isinstance(getattr(blk.mlp, "norm", None), _identity_types()):
            raise UnsupportedModelError(
                f"{label} block {i} normalises its MLP hidden layer, "
                "which narrowing cannot preserve",
                "choose a model without scale_mlp_norm",
            )


def check_finite_outputs(model: nn.Module, images: torch.Tensor, source: str) -> None:
    """One real forward of ``model`` on ``images``: weights that are finite but overflow (NaN or
    inf outputs) are refused, naming the largest weight, before any finetune would report them
    as a diverged loss."""
    import torch

    with torch.inference_mode():
        if bool(model.eval()(images).isfinite().all()):
            return
        big = {n: float(p.abs().max()) for n, p in model.named_parameters() if p.numel()}
    name = max(big, key=lambda n: big[n])
    raise CheckpointMismatchError(
        f"{source} gives outputs that are not finite (NaN/inf) on a real image although its "
        f"weights are finite (largest |value| {big[name]:.3g}, in {name})",
        "use weights whose forward pass is finite (e.g. saved before training diverged)",
    )


def _identity_types() -> tuple[type, ...]:
    from torch import nn

    return (nn.Identity,)


def load_model(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    pretrained_cache: bool = False,
    random_init: bool = False,
) -> LoadedModel:
    """Build ``name`` with timm and load weights from exactly one source.

    ``checkpoint``: a local file (``state_dict``: its content, when already read); missing
    fields of ``model_kwargs`` (num_classes, img_size, patch_size, embed_dim, depth) are
    inferred from it. ``pretrained_cache``: timm's pretrained
    weights from the local hub cache only (offline). ``random_init``: no weights (smoke tests,
    latency studies). The model is returned in eval mode.
    """
    sources = [checkpoint is not None, pretrained_cache, random_init]
    if sum(sources) != 1:
        raise UserInputError(
            "give exactly one weight source",
            "pass --checkpoint FILE, or --pretrained-cache, or --random-init",
        )
    kwargs = dict(model_kwargs or {})
    inferred: dict[str, Any] = {}
    if checkpoint is not None:
        sd = state_dict if state_dict is not None else read_state_dict(checkpoint)
        check_finite(sd, Path(checkpoint).name)
        kwargs_full, inferred = checkpoint_kwargs(sd, kwargs)
        model = create_model(name, kwargs_full)
        check_supported(model, name)
        _load_into(model, sd, checkpoint)
        source = f"checkpoint:{Path(checkpoint).name}"
        kwargs = kwargs_full
    elif pretrained_cache:
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            model = create_model(name, kwargs, pretrained=True)
        except UserInputError:
            raise
        except Exception as exc:  # hub/cache errors come in many types
            raise UserInputError(
                f"pretrained weights for {name} are not in the local hub cache "
                f"({type(exc).__name__})",
                "pass --checkpoint FILE with local weights",
            ) from exc
        check_supported(model, name)
        check_finite(model.state_dict(), f"{name} (hub cache)")
        source = "hub-cache"
    else:
        model = create_model(name, kwargs)
        check_supported(model, name)
        source = "random-init"
        # timm zero-initialises biases and the ONNX simplifier folds x + 0 away, so a random
        # structure's graph would lack nodes its finetuned version has; trained weights have
        # no exactly-zero biases, nor has this model (seeded by the caller)
        import torch

        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(".bias"):
                    p.normal_(0.0, 0.02)
    model.eval()
    return LoadedModel(
        model=model, name=name, model_kwargs=kwargs, weights_source=source, inferred=inferred
    )


def _load_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> None:
    model.load_state_dict(matching_state_dict(model, sd, path), strict=True)


def checkpoint_kwargs(
    sd: Mapping[str, torch.Tensor], model_kwargs: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kwargs to build the model with, the part inferred from the checkpoint).

    Only head size and input geometry are filled from the checkpoint (``num_classes``,
    ``img_size``, ``patch_size``, ``in_chans``) and only where ``model_kwargs`` does not set
    them; depth and width stay as the named model defines them, so a wrong model name is
    reported as a key/shape mismatch instead of silently building another architecture.
    """
    kwargs = dict(model_kwargs or {})
    guessed = infer_kwargs_from_state_dict(sd)
    inferred: dict[str, Any] = {
        key: guessed[key]
        for key in ("num_classes", "img_size", "patch_size", "in_chans")
        if key in guessed and key not in kwargs
    }
    return {**inferred, **kwargs}, inferred


def matching_state_dict(
    model: nn.Module, sd: Mapping[str, torch.Tensor], path: str | os.PathLike[str]
) -> dict[str, torch.Tensor]:
    """``sd`` adapted to ``model`` (timm's filter: position-embedding resampling, ...), or
    :class:`CheckpointMismatchError` listing missing/unexpected keys and shape mismatches.

    Only shapes are compared, so ``model`` may live on the ``meta`` device (an up-front check
    without allocating the model).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        # typed for VisionTransformer; other layouts fail here and take the fallback below
        filtered = checkpoint_filter_fn(dict(sd), cast(Any, model))
    except Exception:  # foreign layouts: fall back to the raw keys and report mismatches below
        filtered = dict(sd)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in filtered)
    unexpected = sorted(k for k in filtered if k not in own)
    shape_bad = sorted(
        f"{k} {tuple(filtered[k].shape)}!={tuple(own[k].shape)}"
        for k in own
        if k in filtered and tuple(filtered[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shape_bad:
            parts.append(f"shape mismatch in {len(shape_bad)} (e.g. {'; '.join(shape_bad[:2])})")
        raise CheckpointMismatchError(
            f"checkpoint {Path(path).name} does not match {type(model).__name__}: "
            + ", ".join(parts),
            "pick the model name the weights were trained with, or pass --model-kwargs "
            "(e.g. depth=, embed_dim=, num_classes=, img_size=)",
        )
    return filtered


def geometry_kwargs(model: nn.Module) -> dict[str, Any]:
    """Construction kwargs that pin the geometry of ``model`` (for rebuilding it exactly)."""
    vit = cast(Any, model)  # timm attributes are dynamic: nn.Module types them Tensor | Module
    pe = vit.patch_embed
    return {
        "img_size": _json_size(pe.img_size),
        "patch_size": _json_size(pe.patch_size),
        "in_chans": int(pe.proj.in_channels),
        "num_classes": int(vit.num_classes),
        "embed_dim": int(vit.embed_dim),
        "depth": len(vit.blocks),
    }


def _json_size(size: Any) -> int | list[int]:
    """An int for square sizes, else a list: the form that survives a JSON round trip."""
    if isinstance(size, (tuple, list)):
        vals = [int(v) for v in size]
        return vals[0] if len(set(vals)) == 1 else vals
    return int(size)

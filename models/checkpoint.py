"""Load weights into a BNext model from official releases, plain state dicts or safetensors."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .precision import apply_constraints

#: Prefixes that wrappers add to every key: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Keys under which training scripts nest the state dict (official: ``state_dict``).
NESTING_KEYS = ("state_dict", "model", "state_dict_ema")
MAX_LISTED = 25


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a file without executing code.

    Accepts ``.safetensors`` files and torch files (loaded with ``weights_only=True``)
    holding a state dict, or a dict that nests it under ``state_dict`` (the
    official release format) or ``model``. Wrapper prefixes (``module.``,
    ``_orig_mod.``) are removed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        raw: object = load_file(path, device="cpu")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler raises many types; all mean "not a safe weights file"
            raise ValueError(
                f"{path!r} cannot be read as a weights-only torch file ({error.__class__.__name__}: {error}). "
                "Files that need arbitrary code to unpickle are refused; re-save the state dict with torch.save "
                "or as safetensors."
            ) from error
    return _strip_prefixes(_unnest(raw, path))


def _unnest(raw: object, path: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path!r} holds a {type(raw).__name__}, not a state dict")
    for key in NESTING_KEYS:
        if key in raw and isinstance(raw[key], Mapping):
            return raw[key]
    return raw


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        stripped[key] = value
    return stripped


def _listing(title: str, items: list[str]) -> str:
    shown = items[:MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointMismatchError` listing missing keys, unexpected keys and shape conflicts."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    conflicts = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or conflicts:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing from the checkpoint", missing),
                ("unexpected in the checkpoint", unexpected),
                ("shape conflicts", conflicts),
            )
            if items
        ]
        raise CheckpointMismatchError(
            "the checkpoint does not fit this model (another architecture, width, ablation or class count?):\n"
            + "\n".join(parts)
        )


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model`` and return the model.

    ``strict`` (default) requires the keys and shapes to match exactly and raises
    :class:`CheckpointMismatchError` naming every difference; with ``strict=False``
    shape conflicts still raise, missing and unexpected keys are ignored. After
    loading, latent binary weights are clipped to ``±1.5`` and recoupling mixes
    to ``[0, 1]`` (:func:`models.apply_constraints`).
    """
    state = read_state_dict(path)
    if strict:
        check_state_dict(model, state)
    else:
        expected = model.state_dict()
        state = {key: value for key, value in state.items() if key in expected}
        check_state_dict(model, {**expected, **state})
    model.load_state_dict(state, strict=strict)
    apply_constraints(model)
    return model

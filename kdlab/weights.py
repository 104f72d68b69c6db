"""Loading weights: checkpoints and plain state dicts (torch or safetensors), into models."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from .errors import ConfigError, RunError


def torch_load(path: Path):
    """``torch.load(weights_only=True)`` with a one-line error for a corrupt file."""
    try:
        with warnings.catch_warnings():  # (a legacy, non-zip pickle makes torch warn before it fails: our line says it)
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"{path}: corrupt or unreadable checkpoint ({type(err).__name__})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path, what: str) -> dict:
    """A plain weights file as a state dict: torch (``.pt``/``.pth``, loaded with
    ``weights_only=True``; a checkpoint's ``state_dict``/``model`` entry and DDP's
    ``module.`` prefix are taken as such) or safetensors. One-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{what}: {path} is a safetensors file: pip install safetensors") from None
        try:
            state = load_file(str(path))
        except Exception as err:
            raise RunError(f"{path}: corrupt or unreadable safetensors file ({type(err).__name__})") from None
    else:
        state = torch_load(path)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(f"{path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model, path: Path, what: str, assign: bool = False) -> None:
    """Load a plain weights file into ``model`` (strictly: every key, every shape). A timm
    model takes timm's / torchvision's own keys or a kdlab ``model.pt`` (keys under
    ``net.``). ``assign=True`` (a model on the meta device) checks keys and shapes only."""
    state = read_state_dict(path, what)
    target = model
    if hasattr(model, "net") and not any(k.startswith("net.") for k in state):
        target = model.net
    try:
        target.load_state_dict(state, assign=assign)
    except (RuntimeError, TypeError, AttributeError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = " ".join(lines[1:3] if len(lines) > 1 else lines)[:300]
        raise RunError(f"{what}: {path} does not fit the model ({reason})") from None


def load_weights_model(name: str, path: Path, num_classes: int, input_shape, what: str):
    """A frozen model in eval mode: ``name`` built for the data, weights from ``path``."""
    from .models import build_model

    try:
        model = build_model(name, num_classes, input_shape=input_shape)
    except ValueError as err:
        raise ConfigError(f"{what}: {err}") from None
    load_weights(model, path, what)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


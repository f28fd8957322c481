"""The model catalogue: the models ``botd model pull`` can fetch, read from ``bots/catalogue.toml``.

It owns reading and checking the catalogue (the packaged file, plus an admin's own file named by
``BOTD_CATALOGUE``), the download URLs of each source (ModelScope, Hugging Face, an admin's
mirror), and the RAM a chat model needs at a given ``n_ctx`` and ``parallel`` -- the same estimate
the engine makes before loading (file x 1.2 + f16 KV cache + state cache). Two kinds of entry:
chat models (GGUF files for ``[model]``) and embedding models (``kind = "embedding"``: a
sentence-transformers folder of files for ``[embeddings] model``).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

MODELSCOPE = "https://www.modelscope.cn"
HUGGINGFACE = "https://huggingface.co"
_SHA = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
KINDS = ("chat", "embedding")


class CatalogueError(ValueError):
    """The catalogue (or an admin's addition to it) is malformed."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    size: int  # 0: unknown
    sha256: str  # "": unknown


@dataclass(frozen=True)
class CatalogueModel:
    name: str
    family: str
    quant: str
    licence: str
    params_b: float
    layers: int
    kv_heads: int
    head_dim: int
    modelscope: str
    huggingface: str
    confirmed: bool
    evidence: str
    files: tuple[ModelFile, ...]
    kind: str = "chat"  # "embedding": a sentence-transformers folder, its files under models_dir/NAME/
    hf_revision: str = ""  # the Hugging Face commit whose files the checksums are of ("": main)

    @property
    def embedding(self) -> bool:
        return self.kind == "embedding"

    @property
    def size(self) -> int:
        """Bytes of all its files (0 when any is unknown)."""
        return 0 if any(f.size == 0 for f in self.files) else sum(f.size for f in self.files)

    @property
    def approx_size(self) -> int:
        """Its size, or, when unknown, an estimate from the parameter count (4.5 bits a weight)."""
        return self.size or int(self.params_b * 1e9 * 4.5 / 8)

    @property
    def verifiable(self) -> bool:
        """Every file has a confirmed checksum."""
        return self.confirmed and all(f.sha256 for f in self.files)

    def kv_bytes(self, n_ctx: int, parallel: int) -> int:
        """The f16 K and V cache of every layer for n_ctx x parallel cells."""
        return self.layers * n_ctx * parallel * self.kv_heads * self.head_dim * 2 * 2

    def ram_needed(self, n_ctx: int, parallel: int, cache_mb: int = 256) -> int:
        """Bytes of RAM to serve it: as the engine estimates before loading a model."""
        return int(self.approx_size * 1.2) + self.kv_bytes(n_ctx, parallel) + cache_mb * 2**20

    def urls(self, file: ModelFile, source: str | None = None) -> list[str]:
        """Where ``file`` can be fetched, in the order to try.

        ``source``: "modelscope", "huggingface", or an admin's mirror URL (the files under it by
        name, ``MIRROR/FILE``); None: ModelScope, Hugging Face, then BOTD_MODEL_MIRROR if set.
        The hubs' addresses can be replaced (a private hub, the tests' fake): BOTD_MODELSCOPE_ENDPOINT
        and HF_ENDPOINT (the name huggingface_hub itself reads, e.g. https://hf-mirror.com).
        An embedding model's files lie in a folder of its name on a mirror (``MIRROR/NAME/FILE``):
        several such models have a ``config.json``.
        """
        ms = os.environ.get("BOTD_MODELSCOPE_ENDPOINT", MODELSCOPE).rstrip("/")
        hf = os.environ.get("HF_ENDPOINT", HUGGINGFACE).rstrip("/")
        hubs = {
            "modelscope": f"{ms}/models/{self.modelscope}/resolve/master/{file.name}" if self.modelscope else "",
            "huggingface": f"{hf}/{self.huggingface}/resolve/{self.hf_revision or 'main'}/{file.name}"
                           if self.huggingface else "",
        }
        under = f"{self.name}/{file.name}" if self.embedding else file.name
        if source is not None:
            if source in hubs:
                return [hubs[source]] if hubs[source] else []
            return [f"{source.rstrip('/')}/{under}"]
        urls = [u for u in hubs.values() if u]
        mirror = os.environ.get("BOTD_MODEL_MIRROR", "").strip()
        if mirror:
            urls.append(f"{mirror.rstrip('/')}/{under}")
        return urls


@dataclass(frozen=True)
class Catalogue:
    version: int
    updated: str
    models: dict[str, CatalogueModel]

    def get(self, name: str) -> CatalogueModel | None:
        return self.models.get(name.strip().lower())


def _model(entry: dict[str, Any], where: str) -> CatalogueModel:
    try:
        name = str(entry["name"]).lower()
        kind = str(entry.get("kind", "chat"))
        # An embedding model needs no KV-cache figures: it is not a chat model.
        arch = (0, 0, 0) if kind == "embedding" else (
            int(entry["layers"]), int(entry["kv_heads"]), int(entry["head_dim"]))
        files = tuple(ModelFile(str(f["name"]), int(f.get("size", 0)), str(f.get("sha256", "")).lower())
                      for f in entry["files"])
        model = CatalogueModel(
            name=name, family=str(entry.get("family", name)), quant=str(entry.get("quant", "")),
            licence=str(entry.get("licence", "")), params_b=float(entry.get("params_b", 0)),
            layers=int(entry.get("layers", arch[0])), kv_heads=int(entry.get("kv_heads", arch[1])),
            head_dim=int(entry.get("head_dim", arch[2])),
            modelscope=str(entry.get("modelscope", "")), huggingface=str(entry.get("huggingface", "")),
            confirmed=bool(entry.get("confirmed", False)), evidence=str(entry.get("evidence", "")), files=files,
            kind=kind, hf_revision=str(entry.get("hf_revision", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogueError(f"{where}: entry {entry.get('name', '?')!r}: missing or bad field ({exc})") from None
    if model.hf_revision and not re.fullmatch(r"[0-9a-f]{40}", model.hf_revision):
        raise CatalogueError(f"{where}: {name}: hf_revision is not a 40-hex-digit commit")
    if kind not in KINDS:
        raise CatalogueError(f"{where}: {name}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not files:
        raise CatalogueError(f"{where}: {name}: no files")
    if model.embedding and not _FILE_NAME.fullmatch(name):
        raise CatalogueError(f"{where}: bad embedding model name {name!r} (it names a folder)")
    for f in files:
        # A file name becomes a path under models_dir: no dot-files, no "..", and a separator only
        # inside an embedding model's folder (sentence-transformers' "1_Pooling/config.json").
        parts = f.name.split("/")
        if len(parts) > (2 if model.embedding else 1) or not all(_FILE_NAME.fullmatch(p) for p in parts):
            raise CatalogueError(f"{where}: {name}: bad file name {f.name!r}")
        if f.sha256 and not _SHA.fullmatch(f.sha256):
            raise CatalogueError(f"{where}: {name}: {f.name}: sha256 is not 64 hex digits")
        if f.size < 0:
            raise CatalogueError(f"{where}: {name}: {f.name}: negative size")
    if model.confirmed and not all(f.sha256 and f.size for f in files):
        raise CatalogueError(f"{where}: {name}: confirmed = true needs every file's sha256 and size")
    return model


def _read(data: dict[str, Any], where: str) -> dict[str, CatalogueModel]:
    models: dict[str, CatalogueModel] = {}
    for entry in data.get("models", []):
        m = _model(entry, where)
        models[m.name] = m
    return models


def load_catalogue(extra: str | os.PathLike[str] | None = None) -> Catalogue:
    """The packaged catalogue, with the entries of ``extra`` (default: BOTD_CATALOGUE) added over it."""
    text = resources.files("bots").joinpath("catalogue.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    models = _read(data, "bots/catalogue.toml")
    extra = extra if extra is not None else os.environ.get("BOTD_CATALOGUE") or None
    if extra:
        try:
            models.update(_read(tomllib.loads(Path(extra).read_text(encoding="utf-8")), str(extra)))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CatalogueError(f"{extra}: cannot read the catalogue: {exc}") from None
    return Catalogue(int(data.get("version", 0)), str(data.get("updated", "")), models)


def total_ram() -> int | None:
    """Bytes of RAM in this box (MemTotal), or None where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

"""Edits of config.toml made by admin commands (``model pull --set-default``, ``init``), comments kept.

``[model]`` / ``[models.NAME]`` for a chat model, ``[embeddings] model`` for an embedding model.

tomlkit keeps every comment and the order of keys; the edited text is checked with the same
validation as ``botd check-config`` (secrets aside) before it replaces the file, atomically and
with the file's mode kept, so a refused edit leaves config.toml as it was.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import tomlkit

from bots.admin_texts import say
from connectors.config import load_config


class ConfigEditError(Exception):
    """The edit was not made; the message says why (in the admin's language)."""


def _load(path: Path) -> Any:
    try:
        return tomlkit.parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.TOMLKitError) as exc:
        raise ConfigEditError(say("CONFIG_UNREADABLE", config=path, error=exc)) from None


def write_checked(path: Path, text: str, *, check_secrets: bool = False) -> None:
    """Replace ``path`` by ``text`` if it passes check-config; atomically, its mode kept.

    The text is written beside the file first (relative paths in it resolve as they will) and
    read back with the very loader ``botd check-config`` uses, platform sections included.
    """
    from core.config import ConfigError

    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            load_config(Path(tmp), check_secrets=check_secrets)
        except ConfigError as exc:
            raise ConfigEditError(say("CONFIG_REJECTED", config=path, error=str(exc).replace(tmp, str(path)))) from None
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def set_model_path(config: Path, model_file: Path, api_name: str, *, section: str | None = None) -> list[str]:
    """Point ``[model]`` (or ``[models.SECTION]``) at ``model_file``; the lines to tell the admin."""
    doc = _load(config)
    notes: list[str] = []
    if section:
        models = doc.get("models")
        if models is None:
            models = tomlkit.table(is_super_table=True)
            doc["models"] = models
        table = models.get(section)
        if table is None:
            table = tomlkit.table()
            models[section] = table
        where = f"models.{section}"
    else:
        table = doc.get("model")
        if table is None:
            table = tomlkit.table()
            doc["model"] = table
        where = "model"
        engine = table.get("engine", "llama_cpp")
        if engine != "llama_cpp":
            notes.append(say("SET_DEFAULT_ENGINE", engine=str(engine)))
            table["engine"] = "llama_cpp"
        table["name"] = api_name
    table["path"] = str(model_file)
    write_checked(config, tomlkit.dumps(doc))
    notes.append(say("SET_DEFAULT", config=config, section=where, path=model_file))
    return notes


def set_embeddings_model(config: Path, folder: Path) -> list[str]:
    """Point ``[embeddings] model`` at the sentence-transformers ``folder``; the lines to tell the admin."""
    doc = _load(config)
    table = doc.get("embeddings")
    if table is None:
        table = tomlkit.table()
        doc["embeddings"] = table
    table["model"] = str(folder)
    write_checked(config, tomlkit.dumps(doc))
    return [say("SET_DEFAULT_EMBEDDINGS", config=config, path=folder)]

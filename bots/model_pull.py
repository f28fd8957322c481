"""``botd model pull`` and ``botd model list``: fetch a catalogue model into models_dir, verified.

A pull downloads each file of the model (the parts of a model published in parts at the same
time) into ``models_dir/.FILE.part``, resuming with an HTTP Range request after a dropped
connection (here, or in a later run), trying ModelScope, Hugging Face and the admin's mirror in
turn. Only when every file has its published size and SHA-256 is it moved into place, atomically
(``os.replace`` in the same folder): a file under its real name is always a whole, checked file.
A file that fails its check is moved aside to ``.FILE.bad`` and never used; a full disk stops the
pull with the bytes so far kept for the next run. The daemon itself never downloads anything.

An embedding model (a sentence-transformers folder) comes down the same way into
``models_dir/.NAME.partial/``; only when every one of its files is checked is that folder renamed
to ``models_dir/NAME``, so a folder under the model's name always holds the whole, checked model.

``--set-default`` then points ``[model] path`` (or ``[models.NAME] path``, or for an embedding
model ``[embeddings] model``) at it, editing config.toml with tomlkit so its comments stay, and
only if the edited file passes check-config.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp

from bots.admin_texts import say, size_text
from bots.models_catalogue import CatalogueError, CatalogueModel, ModelFile, load_catalogue, total_ram
from connectors.config import load_config

_CHUNK = 1 << 20
# Consecutive attempts without a single new byte before a source is given up.
_IDLE_ATTEMPTS = 3


class PullError(Exception):
    """A pull that cannot go on; the message is the admin's (already in their language)."""


@dataclass
class _Bar:
    """One file's progress: a tqdm bar, or nothing (not a terminal, or --progress none)."""

    bar: Any = None

    def start(self, name: str, total: int, done: int, position: int, stream: IO[str], on: bool) -> None:
        if not on:
            return
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total or None, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=name, file=stream, position=position, leave=True, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (os.write may write fewer, e.g. up to a file-size limit, then fail)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


@dataclass
class _Job:
    file: ModelFile
    part: Path
    dest: Path
    expected: str  # "" : nothing to check against (--trust-unverified)
    position: int
    bad: Path  # where a file that fails its check is put aside (never inside a model's folder)
    staged: Path | None = None  # an embedding model's file, checked, inside the .partial folder


class Puller:
    """Fetches the files of one model into ``models_dir``."""

    def __init__(self, models_dir: Path, *, progress: bool, stream: IO[str] | None = None,
                 retry_s: float = 0.5) -> None:
        self.dir = models_dir
        self.progress = progress
        self.stream = stream or sys.stderr
        self.retry_s = retry_s

    async def pull(self, model: CatalogueModel, *, source: str | None = None, sha256: str = "",
                   trust_unverified: bool = False) -> list[Path]:
        """Download, verify and move into place every file of ``model``; the paths, first part first."""
        if sha256 and len(model.files) != 1:
            raise PullError(say("SHA_ONE_FILE", name=model.name, n=len(model.files)))
        if not model.verifiable and not sha256 and not trust_unverified:
            raise PullError(say("UNCONFIRMED", name=model.name, evidence=model.evidence or "?"))
        self.dir.mkdir(parents=True, exist_ok=True)
        if model.embedding:
            return await self._pull_folder(model, source)
        jobs = []
        for i, f in enumerate(model.files):
            # An unconfirmed entry's recorded checksum is still checked: a mismatch is refused.
            expected = sha256 or f.sha256
            jobs.append(_Job(f, self.dir / f".{f.name}.part", self.dir / f.name, expected, i,
                             self.dir / f".{f.name}.bad"))
        with self._locked(model):
            todo = [j for j in jobs if not await self._present(j)]
            await self._download(model, todo, source)
            digests = await self._verify_all(todo)
            # The first part last: its presence under its real name means all parts are in place.
            for j in reversed(todo):
                os.replace(j.part, j.dest)
            self._sync_dir()
        for j, digest in zip(todo, digests, strict=True):
            if not j.expected:
                side = j.dest.with_name(j.dest.name + ".sha256")
                side.write_text(f"{digest}  {j.dest.name}\n")
                print(say("UNVERIFIED_DONE", path=j.dest, sha=digest, side=side), file=self.stream)
            else:
                print(say("DONE", path=j.dest), file=self.stream)
        return [j.dest for j in jobs]

    async def _download(self, model: CatalogueModel, todo: list[_Job], source: str | None) -> None:
        """Fetch every file of ``todo`` at once; one that fails stops the others (bytes kept)."""
        self._check_space(todo)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)
        headers = {"User-Agent": "botd-model-pull"}
        # trust_env: the box's HTTPS_PROXY / NO_PROXY apply, as they do for curl.
        try:
            async with aiohttp.ClientSession(timeout=timeout, headers=headers, trust_env=True,
                                             auto_decompress=False) as session, asyncio.TaskGroup() as parts:
                for j in todo:
                    parts.create_task(self._fetch(session, model, j, source))
        except* PullError as group:
            raise group.exceptions[0] from None

    async def _verify_all(self, jobs: list[_Job]) -> list[str]:
        return list(await asyncio.gather(*(asyncio.to_thread(self._verify, j) for j in jobs)))

    async def _pull_folder(self, model: CatalogueModel, source: str | None) -> list[Path]:
        """An embedding model: its files into ``.NAME.partial/``, checked, then the folder renamed."""
        if not model.verifiable:  # every embedding entry is confirmed; an admin's own must be too
            raise PullError(say("UNCONFIRMED_FOLDER", name=model.name))
        final = self.dir / model.name
        staging = self.dir / f".{model.name}.partial"
        jobs = [_Job(f, staging / f"{f.name}.part", final / f.name, f.sha256, i,
                     self.dir / f".{model.name}.{f.name.replace('/', '_')}.bad", staging / f.name)
                for i, f in enumerate(model.files)]
        with self._locked(model):
            if final.exists():
                # Already here: every file must be the published one, else it is not this model.
                for j in jobs:
                    if not j.dest.is_file() or await asyncio.to_thread(_hash_file, j.dest) != j.expected:
                        raise PullError(say("EXISTS_OTHER", path=final))
                print(say("ALREADY", path=final), file=self.stream)
                return [final]
            for j in jobs:
                j.part.parent.mkdir(parents=True, exist_ok=True)
            # A file checked in an earlier, interrupted run is not fetched again.
            todo = [j for j in jobs if not (j.staged and j.staged.is_file()
                                            and await asyncio.to_thread(_hash_file, j.staged) == j.expected)]
            await self._download(model, todo, source)
            await self._verify_all(todo)
            for j in todo:
                assert j.staged is not None
                os.replace(j.part, j.staged)
            for stray in staging.rglob("*.part"):  # of another version of the entry: not this model's
                stray.unlink()
            os.rename(staging, final)  # the folder appears whole, or not at all
            self._sync_dir()
        print(say("DONE", path=final), file=self.stream)
        return [final]

    @contextlib.contextmanager
    def _locked(self, model: CatalogueModel) -> Iterator[None]:
        """One pull of a model at a time (two would append to the same partial files)."""
        lock = self.dir / (f".{model.name}.lock" if model.embedding else f".{model.files[0].name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PullError(say("LOCKED", name=model.name)) from None
            yield
        finally:
            os.close(fd)

    async def _present(self, job: _Job) -> bool:
        """The file is in place already (and, where a checksum is known, it matches)."""
        if not job.dest.exists():
            return False
        if not job.expected:
            print(say("ALREADY_UNVERIFIED", path=job.dest), file=self.stream)
            return True
        digest = await asyncio.to_thread(_hash_file, job.dest)
        if digest != job.expected:
            raise PullError(say("EXISTS_OTHER", path=job.dest))
        print(say("ALREADY", path=job.dest), file=self.stream)
        return True

    def _check_space(self, jobs: list[_Job]) -> None:
        need = 0
        for j in jobs:
            have = j.part.stat().st_size if j.part.exists() else 0
            need += max(0, j.file.size - have)
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise PullError(say("DISK_SHORT", dir=self.dir, need=size_text(need), free=size_text(free)))

    async def _fetch(self, session: aiohttp.ClientSession, model: CatalogueModel, job: _Job,
                     source: str | None) -> None:
        urls = model.urls(job.file, source)
        errors: list[str] = []
        bar = _Bar()
        try:
            for url in urls:
                if await self._fetch_from(session, url, job, bar, errors):
                    return
        finally:
            bar.close()
        have = job.part.stat().st_size if job.part.exists() else 0
        if have:
            raise PullError(say("INTERRUPTED", file=job.file.name, error="; ".join(errors[-2:]),
                                done=size_text(have), part=job.part))
        raise PullError(say("NO_SOURCE", file=job.file.name, errors="; ".join(errors) or "-"))

    async def _fetch_from(self, session: aiohttp.ClientSession, url: str, job: _Job, bar: _Bar,
                          errors: list[str]) -> bool:
        """Fetch from one source until the file is whole (True) or the source is given up (False)."""
        idle = 0
        while True:
            have = job.part.stat().st_size if job.part.exists() else 0
            if job.file.size and have > job.file.size:  # not this file's bytes: start again
                job.part.unlink()
                have = 0
            if job.file.size and have == job.file.size:
                return True
            headers = {"Range": f"bytes={have}-"} if have else {}
            before = have
            try:
                async with session.get(url, headers=headers) as resp:
                    if resp.status == 416 and have and not job.file.size:
                        return True  # nothing past what we have: the file is whole
                    if resp.status >= 400:
                        errors.append(f"{_host(url)}: HTTP {resp.status}")
                        return False
                    if have and resp.status != 206:  # the server ignored the range: start again
                        job.part.unlink(missing_ok=True)
                        have = before = 0
                    length = resp.content_length
                    total = have + length if length is not None else job.file.size
                    if job.file.size and total and total != job.file.size:
                        errors.append(say("SIZE_MISMATCH", file=job.file.name, want=job.file.size, got=total))
                        return False
                    if have:
                        print(say("RESUMING", file=job.file.name, done=size_text(have)), file=self.stream)
                    else:
                        print(say("FETCHING", file=job.file.name, size=size_text(total or 0), url=_shown(url)),
                              file=self.stream)
                    bar.start(job.file.name, total or 0, have, job.position, self.stream, self.progress)
                    await self._stream_into(resp, job, bar)
                if not job.file.size:
                    return True
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors.append(f"{_host(url)}: {type(exc).__name__}: {exc}".rstrip(": "))
            now = job.part.stat().st_size if job.part.exists() else 0
            idle = 0 if now > before else idle + 1
            if idle >= _IDLE_ATTEMPTS:
                return False
            if now < (job.file.size or now + 1):
                await asyncio.sleep(self.retry_s * (2 ** idle))

    async def _stream_into(self, resp: aiohttp.ClientResponse, job: _Job, bar: _Bar) -> None:
        fd = os.open(job.part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        buf = bytearray()
        try:
            try:
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    buf += chunk
                    if job.file.size and os.fstat(fd).st_size + len(buf) > job.file.size:
                        # More than the published size: not this file (a wrong mirror, a hostile one).
                        buf.clear()
                        raise PullError(say("SIZE_MISMATCH", file=job.file.name, want=job.file.size,
                                            got=f"> {job.file.size}"))
                    if len(buf) >= _CHUNK:
                        await self._write(fd, bytes(buf), job)
                        bar.advance(len(buf))
                        buf.clear()
            finally:
                # Bytes that arrived before a dropped connection are kept: the resume asks for the rest.
                if buf:
                    await self._write(fd, bytes(buf), job)
                    bar.advance(len(buf))
        finally:
            os.close(fd)

    async def _write(self, fd: int, data: bytes, job: _Job) -> None:
        try:
            await asyncio.to_thread(_write_all, fd, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                done = job.part.stat().st_size if job.part.exists() else 0
                need = max(0, job.file.size - done) if job.file.size else len(data)
                free = shutil.disk_usage(self.dir).free
                raise PullError(say("DISK_FULL", dir=self.dir, need=size_text(need), free=size_text(free),
                                    done=size_text(done), part=job.part)) from None
            raise

    def _verify(self, job: _Job) -> str:
        size = job.part.stat().st_size
        if job.file.size and size != job.file.size:
            raise PullError(say("SIZE_MISMATCH", file=job.file.name, want=job.file.size, got=size))
        digest = _hash_file(job.part)
        if job.expected and digest != job.expected:
            os.replace(job.part, job.bad)
            raise PullError(say("MISMATCH", file=job.file.name, want=job.expected, got=digest, bad=job.bad))
        return digest

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _host(url: str) -> str:
    """Host and port of a URL, never the user:password a mirror's URL may carry."""
    parts = urlsplit(url)
    return (f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or "") or "?"


def _shown(url: str) -> str:
    """A URL as it may be printed: without its user:password."""
    parts = urlsplit(url)
    return parts._replace(netloc=_host(url)).geturl() if parts.netloc else url


_URL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.gguf")


def url_model(url: str) -> tuple[CatalogueModel, str]:
    """An ad-hoc single-file model for ``botd model pull https://.../FILE.gguf``."""
    name = Path(urlsplit(url).path).name
    if not _URL_NAME.fullmatch(name):
        raise PullError(say("BAD_URL", url=url))
    base = url[: url.rindex(name)]
    return CatalogueModel(name=name.removesuffix(".gguf").lower(), family=name, quant="", licence="?",
                          params_b=0, layers=0, kv_heads=0, head_dim=0, modelscope="", huggingface="",
                          confirmed=False, evidence=url, files=(ModelFile(name, 0, ""),)), base


# ---------------------------------------------------------------- the CLI side


def models_dir(args: argparse.Namespace, state_dir: Path | None) -> Path:
    if args.dir:
        return Path(args.dir).expanduser().resolve()
    env = os.environ.get("BOTD_MODELS_DIR", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    return (state_dir / "models") if state_dir else Path("models").resolve()


def _config_quietly(path: Path) -> Any:
    """The config if it loads (secrets and files unchecked), else None: `model` works before `init`."""
    from core.config import ConfigError

    try:
        return load_config(path, check_files=False)
    except ConfigError:
        return None


def cmd_list(args: argparse.Namespace) -> int:
    cfg = _config_quietly(args.config)
    try:
        cat = load_catalogue()
    except CatalogueError as exc:
        print(f"botd: {exc}", file=sys.stderr)
        return 1
    n_ctx = cfg.model.n_ctx if cfg else 4096
    parallel = cfg.model.parallel if cfg else 4
    cache_mb = cfg.model.cache_mb if cfg else 256
    where = models_dir(args, cfg.server.state_dir if cfg else None)
    ram = total_ram()
    cores = os.cpu_count() or 1
    print(say("LIST_HEAD", version=cat.version, ram=size_text(ram) if ram else "?", cores=cores,
              n_ctx=n_ctx, parallel=parallel))
    chat = [m for m in cat.models.values() if not m.embedding]
    for m in sorted(chat, key=lambda m: (m.family.split("-")[0], m.params_b, m.quant)):
        need = m.ram_needed(n_ctx, parallel, cache_mb)
        here = all((where / f.name).exists() for f in m.files)
        mark = "✓" if here else ("✗" if ram and need > ram else " ")
        check = " " if m.verifiable else "?"
        size = size_text(m.size) if m.size else "~" + size_text(m.approx_size)
        # About one billion parameters a core keeps an int4 model answering at reading speed.
        slow = " slow" if m.params_b > cores else ""
        print(f" {mark}{check} {m.name:<32} {size:>10}  RAM {size_text(need):>9}  {m.licence}{slow}")
    embedding = sorted((m for m in cat.models.values() if m.embedding), key=lambda m: m.name)
    if embedding:
        print(say("LIST_EMBED_HEAD"))
    for m in embedding:
        here = (where / m.name).is_dir()
        print(f" {'✓' if here else ' '}{' ' if m.verifiable else '?'} {m.name:<32} {size_text(m.size):>10}  "
              f"{len(m.files)} files  {m.licence}")
    print(say("LIST_FOOT"))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    cfg = _config_quietly(args.config)
    sha = (args.sha256 or "").strip().lower()
    if sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        print(f"botd: {say('BAD_SHA_ARG')}", file=sys.stderr)
        return 1
    source = args.source
    try:
        if re.match(r"https?://", args.name):
            model, source = url_model(args.name)
        else:
            cat = load_catalogue()
            found = cat.get(args.name)
            if found is None:
                raise PullError(say("UNKNOWN_MODEL", name=args.name, known=", ".join(sorted(cat.models))))
            model = found
        if model.embedding and (sha or args.trust_unverified or args.as_name):
            raise PullError(say("EMBED_FLAGS"))
        where = models_dir(args, cfg.server.state_dir if cfg else None)
        progress = args.progress == "bar" or (args.progress == "auto" and sys.stderr.isatty())
        paths = asyncio.run(Puller(where, progress=progress).pull(
            model, source=source, sha256=sha, trust_unverified=args.trust_unverified))
    except (PullError, CatalogueError) as exc:
        print(f"botd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n" + say("CANCELLED"), file=sys.stderr)
        return 130
    if model.embedding:
        return _embedding_done(args, model, paths[0])
    if args.set_default:
        from bots.config_edit import ConfigEditError, set_model_path

        try:
            notes = set_model_path(args.config, paths[0], model.name, section=args.as_name)
        except ConfigEditError as exc:
            print(f"botd: {exc}", file=sys.stderr)
            return 1
        for line in notes:
            print(line)
    else:
        print(say("NEXT_USE", name=model.name, path=paths[0]))
    return 0


def sentence_transformers_missing() -> bool:
    """The ``botd[sentence-transformers]`` extra is not installed (found without importing torch)."""
    try:
        return importlib.util.find_spec("sentence_transformers") is None
    except (ImportError, ValueError):  # a broken or blocked installation is as good as none
        return True


def _embedding_done(args: argparse.Namespace, model: CatalogueModel, folder: Path) -> int:
    """After an embedding model's pull: name the missing extra, point [embeddings] model at it."""
    missing = sentence_transformers_missing()
    if missing:
        print(say("EMBED_EXTRA_MISSING", python=sys.executable), file=sys.stderr)
    if not args.set_default:
        print(say("NEXT_USE_EMBEDDINGS", name=model.name, path=folder))
        return 0
    if missing:
        # botd would fail to load the knowledge bases with this setting: config.toml stays as it was.
        print(f"botd: {say('EMBED_NOT_SET', config=args.config)}", file=sys.stderr)
        return 1
    from bots.config_edit import ConfigEditError, set_embeddings_model

    try:
        notes = set_embeddings_model(args.config, folder)
    except ConfigEditError as exc:
        print(f"botd: {exc}", file=sys.stderr)
        return 1
    for line in notes:
        print(line)
    return 0


def add_parser(sub: Any, with_config: Any) -> None:
    """``botd model list|pull`` on the CLI's subparsers."""
    p = sub.add_parser("model", help="chat and embedding models: list the catalogue, download one (verified)")
    msub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sp = with_config(msub.add_parser("list", help="the catalogue: sizes, RAM needed, what is downloaded"))
    sp.add_argument("--dir", help="models folder (default: BOTD_MODELS_DIR, else STATE_DIR/models)")
    sp = with_config(msub.add_parser("pull", help="download a catalogue model (or a https://.../FILE.gguf)"))
    sp.add_argument("name", help="a name from `botd model list`, or a plain URL of a .gguf file")
    sp.add_argument("--source", help="only this source: modelscope, huggingface, or a mirror URL "
                                     "(files under it by name); default: ModelScope, Hugging Face, BOTD_MODEL_MIRROR")
    sp.add_argument("--dir", help="models folder (default: BOTD_MODELS_DIR, else STATE_DIR/models)")
    sp.add_argument("--sha256", help="the file's SHA-256 as the publisher's page shows it (one-file models)")
    sp.add_argument("--trust-unverified", action="store_true",
                    help="download a model whose checksum is not confirmed; its SHA-256 is printed to compare")
    sp.add_argument("--set-default", action="store_true",
                    help="point [model] path (or [models.NAME] with --as; an embedding model: [embeddings] "
                         "model) at it in config.toml, comments kept")
    sp.add_argument("--as", dest="as_name", help="with --set-default: write a [models.AS] section instead")
    sp.add_argument("--progress", choices=["auto", "bar", "none"], default="auto",
                    help="progress bar: auto (only on a terminal), bar, none")


def main(args: argparse.Namespace) -> int:
    return cmd_list(args) if args.action == "list" else cmd_pull(args)

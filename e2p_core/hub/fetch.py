""""Give me the local path of X": model files from disk first, from the Hugging Face hub only when missing and allowed.

Where a file of the table (:mod:`.sources`) is looked for, in order:

1. the store's folders: ComfyUI's ``models/<folder>/`` (every path ComfyUI knows for that folder), or a ``--to`` folder;
2. the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), for the file's repository and its ungated copy.
   This reads the cache's ``refs/`` and ``snapshots/`` only: a file that is present never causes a network call.

A missing file is downloaded (unless ``HF_HUB_OFFLINE`` is set or the caller forbids it) from ``HF_ENDPOINT`` with the
token of ``HF_TOKEN`` or ``hf auth login``:

* into the store's first folder: to ``<name>.<etag>.incomplete`` next to the final name (a name no loader lists),
  resumed with an HTTP Range request after an interruption or a Cancel (the client retries dropped connections
  itself; a later run continues the same ``.incomplete`` file), then checked and renamed into place;
* or, without store folders, into the Hugging Face cache with the client's ``hf_hub_download`` (shared with diffusers
  and transformers; its own Range retries cover dropped connections within one run).

Before a download the free disk space is checked against the hub's size; after it, the size and the content hash
(the LFS sha256, or the git blob sha1 of small files) are checked. A mismatch is deleted and fetched once more; a
second mismatch is an error. Every failure is a :class:`~e2p_core.errors.HubError` saying what to do.

This is the only module that imports ``huggingface_hub`` (and its HTTP library), and only when a file is not found
on disk, so importing it costs nothing on ComfyUI's node import path.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..errors import HubError
from .sources import HubFile, ModelFile, format_bytes, model_file

logger = logging.getLogger(__name__)

# (bytes on disk so far, total bytes): called as a download advances. It may raise (e.g. ComfyUI's Cancel) to stop
# the download; what arrived stays in the ``.incomplete`` file and the next call resumes from it.
ProgressCallback = Callable[[int, int], None]

_HASH_CHUNK = 16 * 1024 * 1024
_FREE_DISK_MARGIN = 64 * 1024 * 1024  # leave room for the filesystem and the rename
_TOKENS_PAGE = "https://huggingface.co/settings/tokens"


# ----------------------------------------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Store:
    """Where model files are looked for and where downloads go.

    ``folders(folder_name)`` lists the folders searched for a file of that ComfyUI folder (``loras``, ``vae``, ...);
    downloads go into the first. Without ``folders`` only the Hugging Face cache is used, and downloads go there.
    ``progress`` follows the downloads made for this store when a call gives none (e.g. a ComfyUI progress bar).
    """

    folders: Callable[[str], Sequence[Path]] | None = None
    description: str = "the Hugging Face cache"
    progress: ProgressCallback | None = None

    @classmethod
    def directory(cls, path: str | os.PathLike) -> Store:
        """One folder for everything (``download --to DIR``)."""
        root = Path(path)
        return cls(lambda _folder: [root], str(root))

    @classmethod
    def comfyui(cls, comfyui_dir: str | os.PathLike) -> Store:
        """A ComfyUI installation: ``<comfyui_dir>/models/<folder>/``."""
        models = Path(comfyui_dir) / "models"
        return cls(lambda folder: [models / folder], f"{models}/<folder>")

    def search_dirs(self, file: ModelFile) -> list[Path]:
        return [Path(path) for path in self.folders(file.folder)] if self.folders else []

    def download_path(self, file: ModelFile) -> Path | None:
        """Where ``file`` is written when downloaded; None = the Hugging Face cache."""
        dirs = self.search_dirs(file)
        return dirs[0] / file.name if dirs else None

    def where_to_put(self, file: ModelFile) -> str:
        """The folder to tell a user to put ``file`` in by hand."""
        target = self.download_path(file)
        return str(target.parent) if target else f"a folder you pass with --models-dir (ComfyUI: models/{file.folder}/)"


# --------------------------------------------------------------------------------------------------------- resolve


def find_local(key_or_file: str | ModelFile, store: Store = Store()) -> Path | None:
    """The file on disk (store folders, then the Hugging Face cache), or None. Never touches the network."""
    file = _as_model_file(key_or_file)
    for folder in store.search_dirs(file):
        candidate = folder / file.name
        if candidate.is_file():
            return candidate
    return _find_in_hf_cache(file)


def resolve(
    key_or_file: str | ModelFile,
    store: Store = Store(),
    *,
    download: bool = True,
    progress: ProgressCallback | None = None,
) -> Path:
    """The local path of a table file (e.g. ``resolve("depth_lora")``), downloading it when missing and allowed.

    ``download=False`` (or ``HF_HUB_OFFLINE=1``) only looks on disk. ``progress(done, total)`` follows the bytes of a
    download. Raises :class:`HubError` with what to do when the file cannot be had.
    """
    return resolve_all([key_or_file], store, download=download, progress=progress)[_as_model_file(key_or_file).key]


def resolve_all(
    keys: Iterable[str | ModelFile],
    store: Store = Store(),
    *,
    download: bool = True,
    progress: ProgressCallback | None = None,
    copy_into_store: bool = False,
) -> dict[str, Path]:
    """``{key: local path}`` for several table files: all found on disk first, then the missing ones downloaded.

    When some files cannot be had (offline, hub unreachable), the error names every missing file, its repository and
    the folder to put it in by hand, not only the first. ``copy_into_store`` copies files found only in the Hugging
    Face cache into the store's folders (``download --comfyui`` puts every file where ComfyUI lists it).
    """
    files = [_as_model_file(key) for key in keys]
    paths = {file.key: find_local(file, store) for file in files}
    if copy_into_store:
        for file in files:
            target = store.download_path(file)
            if paths[file.key] is not None and target is not None and paths[file.key] != target:
                paths[file.key] = _copy_into(paths[file.key], target)
    missing = [file for file in files if paths[file.key] is None]
    if not missing:
        return paths
    if not download or is_offline():
        reason = "HF_HUB_OFFLINE is set" if download else "downloads are off"
        raise HubError(_missing_message(missing, store, reason))
    _check_free_disk(missing, store)
    for index, file in enumerate(missing):
        try:
            paths[file.key] = _download(file, store, progress or store.progress)
        except _Unreachable as error:
            raise HubError(_missing_message(missing[index:], store, f"the hub is unreachable ({error})")) from None
    return paths


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (read now, not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def endpoint() -> str:
    """``HF_ENDPOINT`` (read now), else the public hub."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the client computes it, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _copy_into(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    _check_free_disk_at(target.parent, source.stat().st_size, [target.name])
    partial = target.with_name(f"{target.name}.copy.incomplete")
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _as_model_file(key_or_file: str | ModelFile) -> ModelFile:
    return key_or_file if isinstance(key_or_file, ModelFile) else model_file(key_or_file)


def _find_in_hf_cache(file: ModelFile) -> Path | None:
    # The cache's own layout, read without the client: models--owner--name/refs/<revision> holds the commit,
    # snapshots/<commit>/<path> the file. (try_to_load_from_cache does the same, but would import the client.)
    for remote in (file.hub, file.ungated_copy):
        if remote is None:
            continue
        repo_dir = hf_cache_dir() / f"models--{remote.repo.replace('/', '--')}"
        ref = repo_dir / "refs" / remote.revision
        commit = ref.read_text().strip() if ref.is_file() else remote.revision
        candidate = repo_dir / "snapshots" / commit / remote.path
        if candidate.is_file():
            return candidate
    return None


# -------------------------------------------------------------------------------------------------------- download


class _Unreachable(Exception):
    """The hub could not be reached (connection refused, DNS, timeout, 5xx)."""


class _Mismatch(Exception):
    """What arrived does not have the size or hash the hub announced."""


@dataclass
class _Remote:
    """A hub file as the hub describes it right now."""

    hub_file: HubFile
    url: str  # where the bytes are (the hub's redirect target for LFS files)
    etag: str  # LFS sha256 (64 hex) or git blob sha1 (40 hex)
    size: int
    same_host: bool  # False: a CDN, which must not see the token
    extra: dict = field(default_factory=dict)


def _download(file: ModelFile, store: Store, progress: ProgressCallback | None) -> Path:
    remote = _describe_remote(file)
    target = store.download_path(file)
    for attempt in (1, 2):
        try:
            if target is None:
                return _download_to_hf_cache(file, remote, progress)
            _download_to_folder(file, remote, target, progress)
            return target
        except _Mismatch as error:
            if attempt == 2:
                raise HubError(
                    f"{file.name} from {remote.hub_file.repo} arrived damaged twice ({error}); nothing was kept. "
                    f"Try again later, or download {_url(remote.hub_file)} yourself into {store.where_to_put(file)}"
                ) from None
            logger.warning("%s arrived damaged (%s); fetching it again", file.name, error)
    raise AssertionError("unreachable")


def _describe_remote(file: ModelFile) -> _Remote:
    """HEAD the file (or its ungated copy when the hub lists the same sha256 for both)."""
    hub_file, expected_sha256 = _choose_source(file)
    remote = _head(file, hub_file)
    if expected_sha256 is not None and remote.etag != expected_sha256:
        remote = _head(file, file.hub)  # the copy changed since the listing: take the original
    return remote


def _choose_source(file: ModelFile) -> tuple[HubFile, str | None]:
    """The ungated copy with the sha256 it must have, when the hub lists the same LFS sha256 for it and the original;
    else the original. The listing is public metadata even for gated repositories."""
    if file.ungated_copy is None:
        return file.hub, None
    original, copy = _listed_sha256(file.hub), _listed_sha256(file.ungated_copy)
    if original is not None and original == copy:
        logger.info("%s: using the identical ungated copy in %s", file.name, file.ungated_copy.repo)
        return file.ungated_copy, original
    logger.info("%s: the ungated copy in %s differs (sha256 %s vs %s); using %s", file.name, file.ungated_copy.repo,
                copy, original, file.hub.repo)
    return file.hub, None


def _listed_sha256(hub_file: HubFile) -> str | None:
    client = _client()
    try:
        info = client.HfApi(endpoint=endpoint()).model_info(hub_file.repo, revision=hub_file.revision,
                                                            files_metadata=True)
    except (client.errors.HfHubHTTPError, _transport_errors()) as error:
        logger.info("cannot list %s (%s)", hub_file.repo, error)
        return None
    for sibling in info.siblings or ():
        if sibling.rfilename == hub_file.path and sibling.lfs is not None:
            return sibling.lfs.sha256
    return None


def _head(file: ModelFile, hub_file: HubFile) -> _Remote:
    client = _client()
    url = client.hf_hub_url(hub_file.repo, hub_file.path, revision=hub_file.revision, endpoint=endpoint())
    try:
        metadata = client.get_hf_file_metadata(url, endpoint=endpoint())
    except Exception as error:  # noqa: BLE001 - translated below; anything unknown is re-raised there
        raise _translate(error, file, hub_file) from None
    if metadata.etag is None or metadata.size is None or metadata.commit_hash is None:
        raise HubError(f"{endpoint()} did not describe {hub_file.repo}/{hub_file.path} as a Hugging Face hub does "
                       f"(no ETag, size or commit); check HF_ENDPOINT")
    same_host = urlparse(metadata.location).netloc == urlparse(url).netloc
    return _Remote(hub_file, metadata.location, metadata.etag, metadata.size, same_host)


def _download_to_folder(file: ModelFile, remote: _Remote, target: Path, progress: ProgressCallback | None) -> None:
    """Download into ``<target>.<etag>.incomplete`` (resuming what is there), check it, rename it to ``target``."""
    client = _client()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{remote.etag[:16]}.incomplete")
    for stale in target.parent.glob(f"{target.name}.*.incomplete"):  # another version of the file: useless now
        if stale != partial:
            stale.unlink(missing_ok=True)
    done = partial.stat().st_size if partial.exists() else 0
    if done > remote.size:
        partial.unlink()
        done = 0
    _check_free_disk_at(target.parent, remote.size - done, [file.name])
    if done:
        logger.info("%s: resuming at %s of %s", file.name, format_bytes(done), format_bytes(remote.size))
    headers = client.utils.build_hf_headers() if remote.same_host else {}
    try:
        with open(partial, "ab") as handle:
            client.file_download.http_get(remote.url, handle, resume_size=done, headers=headers,
                                          expected_size=remote.size, displayed_filename=file.name,
                                          tqdm_class=_progress_bar_class(progress))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise HubError(_disk_full_message(target.parent, remote.size - _size(partial), [file.name])) from None
        if "Consistency check failed" in str(error):  # the body ended early or ran long
            arrived = _size(partial)
            partial.unlink(missing_ok=True)
            raise _Mismatch(f"{arrived} bytes instead of {remote.size}") from None
        raise
    except (client.errors.HfHubHTTPError, _transport_errors()) as error:
        raise _translate(error, file, remote.hub_file) from None
    problem = _content_problem(partial, remote.etag, remote.size)
    if problem:
        partial.unlink()
        raise _Mismatch(problem)
    os.replace(partial, target)


def _download_to_hf_cache(file: ModelFile, remote: _Remote, progress: ProgressCallback | None) -> Path:
    client = _client()
    cache = hf_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    _check_free_disk_at(cache, remote.size, [file.name])
    hub_file = remote.hub_file
    try:
        pointer = Path(client.hf_hub_download(hub_file.repo, hub_file.path, revision=hub_file.revision,
                                              cache_dir=cache, endpoint=endpoint(),
                                              tqdm_class=_progress_bar_class(progress)))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise HubError(_disk_full_message(cache, remote.size, [file.name])) from None
        if "Consistency check failed" in str(error):
            raise _Mismatch(str(error).split("\n")[0]) from None
        raise
    except Exception as error:  # noqa: BLE001 - translated below; anything unknown is re-raised there
        raise _translate(error, file, hub_file) from None
    blob = pointer.resolve()
    problem = _content_problem(blob, remote.etag, remote.size)
    if problem:
        pointer.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise _Mismatch(problem)
    return pointer


def _content_problem(path: Path, etag: str, size: int) -> str | None:
    """None when ``path`` has the size and hash the hub announced, else what is wrong."""
    actual_size = path.stat().st_size
    if actual_size != size:
        return f"{actual_size} bytes instead of {size}"
    if re.fullmatch(r"[0-9a-f]{64}", etag):  # LFS files: the sha256 of the content
        digest = _hash_file(path, hashlib.sha256())
    elif re.fullmatch(r"[0-9a-f]{40}", etag):  # small files: git's blob id, sha1 of "blob <size>\0" + content
        digest = _hash_file(path, hashlib.sha1(f"blob {size}\0".encode()))
    else:
        return None
    return None if digest == etag else f"content hash {digest[:12]}... instead of {etag[:12]}..."


def _hash_file(path: Path, digest) -> str:
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# ------------------------------------------------------------------------------------------------------ disk space


def _check_free_disk(files: list[ModelFile], store: Store) -> None:
    """Before any download: is there room for all of ``files`` (table sizes) in each target folder?"""
    needs: dict[Path, list[ModelFile]] = {}
    for file in files:
        target = store.download_path(file)
        needs.setdefault(target.parent if target else hf_cache_dir(), []).append(file)
    for folder, group in needs.items():
        _check_free_disk_at(folder, sum(file.approx_bytes for file in group), [file.name for file in group])


def _check_free_disk_at(folder: Path, needed_bytes: int, names: list[str]) -> None:
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if free < needed_bytes + _FREE_DISK_MARGIN:
        raise HubError(_disk_full_message(folder, needed_bytes, names, free))


def _disk_full_message(folder: Path, needed_bytes: int, names: list[str], free: int | None = None) -> str:
    if free is None:
        existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), Path("/"))
        free = shutil.disk_usage(existing).free
    return (f"not enough disk space in {folder} for {', '.join(names)}: {format_bytes(needed_bytes)} needed, "
            f"{format_bytes(free)} free. Free {format_bytes(needed_bytes + _FREE_DISK_MARGIN - free)} or more, or "
            f"download to another disk (--to DIR, or HF_HOME for the Hugging Face cache)")


# ---------------------------------------------------------------------------------------------------------- errors


def _translate(error: Exception, file: ModelFile, hub_file: HubFile) -> Exception:
    """A hub client error as a HubError saying what to do (or _Unreachable, or ``error`` itself if unknown)."""
    client = _client()
    errors = client.errors
    page = _url(hub_file, page=True)
    refused = isinstance(error, errors.HfHubHTTPError) and _status(error) in (401, 403)
    if isinstance(error, errors.GatedRepoError) or (file.gated and hub_file == file.hub and refused):
        token = client.get_token()
        lines = [
            f"{file.name} is in the gated repository {hub_file.repo} ({file.licence}); the hub refused it "
            f"(HTTP {_status(error)}).",
            f"1. Accept the licence at {page} while logged in to your Hugging Face account.",
            f"2. Log in here: run `hf auth login`, or set HF_TOKEN to a read token from {_TOKENS_PAGE}.",
        ]
        if token:
            lines.append("A token is set: if you have accepted the licence, it may be stale, revoked, or from another "
                         "account; make a new one and log in again.")
        if file.ungated_alternative:
            lines.append(f"Or use {file.ungated_alternative}.")
        return HubError("\n".join(lines))
    if isinstance(error, errors.RepositoryNotFoundError):
        return HubError(f"the hub at {endpoint()} has no repository {hub_file.repo} (or it is private and your token "
                        f"cannot read it; `hf auth login` or HF_TOKEN), so {file.name} cannot be downloaded. "
                        f"Put the file by hand in its folder, or check HF_ENDPOINT")
    if isinstance(error, (errors.RemoteEntryNotFoundError, errors.RevisionNotFoundError)):
        return HubError(f"{hub_file.repo} has no file {hub_file.path} at revision {hub_file.revision} any more; "
                        f"see {page} for where it went, and put {file.name} in its folder by hand")
    if isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, _transport_errors())):
        return _Unreachable(_short(error))
    if isinstance(error, errors.HfHubHTTPError):
        status = _status(error)
        if status is None or status >= 500 or status == 429:
            return _Unreachable(_short(error))
        return HubError(f"the hub refused {hub_file.repo}/{hub_file.path} (HTTP {status}): {_short(error)}")
    return error


def _missing_message(missing: list[ModelFile], store: Store, reason: str) -> str:
    lines = [f"{len(missing)} model file(s) are not on this machine and cannot be downloaded ({reason}):"]
    for file in missing:
        lines.append(f"  {file.name} ({file.size_text}) from {_url(file.hub)} -> put it in {store.where_to_put(file)}")
    lines.append(f"(searched: {store.description} and the Hugging Face cache {hf_cache_dir()}). "
                 f"Connect and run again, or unset HF_HUB_OFFLINE, or place the files by hand.")
    return "\n".join(lines)


def _url(hub_file: HubFile, page: bool = False) -> str:
    if page:
        return f"{endpoint()}/{hub_file.repo}"
    return f"{endpoint()}/{hub_file.repo}/blob/{hub_file.revision}/{hub_file.path}"


def _status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


# ------------------------------------------------------------------------------------------------ the hub client


def _client():
    """huggingface_hub, imported on first use (the node import path must stay light)."""
    import huggingface_hub
    import huggingface_hub.errors
    import huggingface_hub.file_download
    import huggingface_hub.utils

    return huggingface_hub


def _transport_errors() -> type[Exception]:
    import httpx2  # the hub client's HTTP library

    return httpx2.TransportError


def _progress_bar_class(progress: ProgressCallback | None):
    """The client's tqdm (a byte progress bar on the console) that also reports to ``progress``."""
    from huggingface_hub.utils import tqdm

    class _ReportingBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Counted here too: a disabled bar (no terminal, HF_HUB_DISABLE_PROGRESS_BARS) does not count.
            self.bytes_done, self.bytes_total = kwargs.get("initial", 0) or 0, kwargs.get("total") or 0
            if progress is not None:
                progress(self.bytes_done, self.bytes_total)

        def update(self, n=1):
            result = super().update(n)
            self.bytes_done += n or 0
            if progress is not None:
                progress(self.bytes_done, self.bytes_total)
            return result

    return _ReportingBar

"""Model files in the loaders' pickers: the local files, plus the known ones (``e2p_core.hub`` sources table) that are
not on disk yet, marked as downloads with their size. Choosing one fetches it into ComfyUI's own folder
(``models/diffusion_models``, ``loras``, ``vae``, ...; the first path ComfyUI knows for it) with a progress bar and
Cancel, then the node loads it. A file that is present is used as it is: no network call.

A table file may be named by its plain file name or by its download label, before and after it is downloaded, so a
workflow saved either way keeps working (the loaders' ``VALIDATE_INPUTS`` accept both).
"""

from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from ..e2p_core.hub import MODEL_FILES, ModelFile, ProgressCallback, Store, find_local, resolve


def comfy_store(progress: ProgressCallback | None = None) -> Store:
    """Every folder ComfyUI knows for a model folder (extra_model_paths.yaml included); downloads go to the first."""
    return Store(lambda folder: [Path(path) for path in folder_paths.get_folder_paths(folder)],
                 "ComfyUI's model folders", progress)


def download_progress(total_bytes: int, node_id: str | None = None) -> ProgressCallback:
    """A download's bytes on a ComfyUI progress bar of ``node_id``; raises at Cancel (what arrived is kept)."""
    progress_bar = comfy.utils.ProgressBar(total_bytes, node_id=node_id)

    def report(done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress_bar.update_absolute(done, total or None)

    return report


def download_label(file: ModelFile) -> str:
    return f"{file.name} (download {file.size_text})"


def choices(folder: str, local: list[str] | None = None, family: str | None = "e2p") -> list[str]:
    """The picker's list: the files in ``folder``, then the table's files of the model ``family`` (None: any) for it
    that are not on disk yet."""
    local = folder_paths.get_filename_list(folder) if local is None else local
    extra = []
    for file in _table_files(folder, family):
        if file.name not in local:
            extra.append(file.name if find_local(file, comfy_store()) else download_label(file))
    return [*local, *extra]


def unknown_choice(folder: str, choice: str, family: str | None = "e2p") -> str | None:
    """Why a loader of ``folder`` refuses ``choice``, or None when it takes it: a local file or a table file (plain
    name or download label). Loaders check this in VALIDATE_INPUTS rather than against the list, so that a known
    file's label and its plain name are both valid before and after it is downloaded."""
    if choice in folder_paths.get_filename_list(folder) or _table_file(folder, choice, family) is not None:
        return None
    return f"{choice!r} is neither in models/{folder} nor a known download"


def full_path(folder: str, choice: str, node_id: str | None = None, family: str | None = "e2p") -> str:
    """The local path of the picked file, downloading a table file that is not on disk yet.

    The download drives a ComfyUI progress bar (bytes) and stops at Cancel; what arrived is kept and the next run
    resumes it.
    """
    local = folder_paths.get_full_path(folder, choice)
    if local is not None:
        return local
    file = _table_file(folder, choice, family)
    if file is None:
        return folder_paths.get_full_path_or_raise(folder, choice)  # ComfyUI's own "not found" error
    return str(resolve(file, comfy_store(download_progress(file.approx_bytes, node_id))))


def _table_files(folder: str, family: str | None) -> list[ModelFile]:
    # Each family's loaders list its own files only: the other family's would be wrong choices there. The VAE
    # loader serves both (family None).
    return [file for file in MODEL_FILES.values()
            if file.folder == folder and file.name.endswith(".safetensors") and family in (None, file.family)]


def _table_file(folder: str, choice: str, family: str | None) -> ModelFile | None:
    return next((file for file in _table_files(folder, family) if choice in (file.name, download_label(file))), None)

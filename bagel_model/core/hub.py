"""Hub ids (``"ByteDance-Seed/BAGEL-7B-MoT"``) resolved to a local checkpoint directory the way diffusers does it:
through huggingface_hub's cache (``snapshot_download``), downloading what is missing unless offline."""
from __future__ import annotations

import os


class HubError(ValueError):
    """A hub id that cannot be resolved to a local snapshot."""


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` with no path separators beyond that one slash, and not an existing path."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not os.path.exists(name) and "\\" not in name


def resolve_hub_id(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool | None = None) -> str:
    """The local snapshot directory of ``repo_id`` (at ``revision``, default the ``main`` ref) in huggingface_hub's
    cache (``cache_dir``, default huggingface_hub's: ``HF_HUB_CACHE`` / ``HF_HOME``). ``local_files_only``: never
    download (default: huggingface_hub's ``HF_HUB_OFFLINE``). A missing snapshot offline, an invalid id or a failed
    download is a ``HubError`` naming the id."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise HubError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed ({e})") from None
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else bool(local_files_only)
    where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a valid hub id: {e}") from None
    except LocalEntryNotFoundError:
        if offline:
            raise HubError(f"{repo_id!r}{'@' + revision if revision else ''} is not in the Hugging Face cache {where!r} "
                           "and downloads are off (HF_HUB_OFFLINE is set, or local_files_only=True): download it once "
                           f"online (`hf download {repo_id}`), or pass a checkpoint directory") from None
        raise HubError(f"{repo_id!r} could not be downloaded into {where!r} (no connection to the hub?); with "
                       "HF_HUB_OFFLINE=1 the cache alone is used") from None
    except OSError as e:  # RepositoryNotFoundError, RevisionNotFoundError, HTTP errors derive from it
        raise HubError(f"{repo_id!r} could not be resolved: {type(e).__name__}: {e}") from None

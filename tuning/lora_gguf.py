"""A trained peft LoRA adapter in llama.cpp's formats: a GGUF LoRA adapter beside the base GGUF, or merged into it.

Written with the `gguf` package's reader, writer, tensor-name map and quantizers; nothing of llama.cpp is vendored.
What has to be right for llama.cpp to answer as the torch engine does:

- tensor names: peft's `model.layers.3.self_attn.q_proj` is `blk.3.attn_q` (gguf's TensorNameMap for the base
  GGUF's architecture);
- layout: llama.cpp's converter permutes the rows of a llama model's q and k projections (its rotary embedding
  pairs dimensions differently). W' = W + s·B·A, so only B's rows (the output side) get the same permutation;
- scale: peft scales each LoRA by alpha/r (alpha/√r with rsLoRA, per module with rank or alpha patterns). That
  scale is folded into B and the adapter's alpha written as 0, which llama.cpp reads as "scale 1";
- what llama.cpp cannot apply (DoRA's magnitudes, modules_to_save, LoRA on embeddings) is refused with a reason.

The probe check in tuning.export proves the result answers like the torch engine.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tuning.errors import TuningError


class GGUFConversionError(TuningError):
    """An adapter or model that cannot be written as GGUF (the message says why)."""


# llama.cpp permutes q/k rows for these architectures (convert_hf_to_gguf's LlamaModel and its subclasses).
PERMUTED_ARCHS = {"llama"}
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class BaseInfo:
    """What the conversion needs to know of the base GGUF."""

    path: Path
    arch: str
    n_head: int
    n_head_kv: int
    n_blocks: int
    shapes: dict[str, tuple[int, ...]]  # tensor name -> (rows, columns) as numpy sees the float weight


def read_base(path: str | Path) -> BaseInfo:
    """Architecture, head counts and tensor shapes of a base model's GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = value("general.architecture")
    if not arch:
        raise GGUFConversionError(f"{path} has no general.architecture: not a model GGUF")
    n_head = int(value(f"{arch}.attention.head_count", 0) or 0)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return BaseInfo(path=Path(path), arch=arch, n_head=n_head,
                    n_head_kv=int(value(f"{arch}.attention.head_count_kv", n_head) or n_head),
                    n_blocks=int(value(f"{arch}.block_count", 0) or 0), shapes=shapes)


def permute_rows(weight, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.LlamaModel.permute) applied to a (rows, …) array."""
    rows = weight.shape[0]
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GGUFConversionError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)") from None


def _check_convertible(config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise GGUFConversionError(f"only LoRA adapters convert to GGUF, not {config.get('peft_type')}")
    if config.get("use_dora"):
        raise GGUFConversionError("a DoRA adapter cannot be applied by llama.cpp (it has no magnitude vectors): "
                                  "export it as `merged`, or train with --method lora")
    if config.get("modules_to_save"):
        raise GGUFConversionError("this adapter also trains whole modules (modules_to_save), which a GGUF LoRA "
                                  "cannot carry: export it as `merged`")


def lora_pairs(adapter_dir: str | Path) -> dict[str, tuple]:
    """peft module name (model.layers.0.self_attn.q_proj) -> (A, B·scale) as float32 numpy arrays."""
    import numpy as np
    from safetensors.numpy import load_file

    config = adapter_config(adapter_dir)
    _check_convertible(config)
    path = Path(adapter_dir) / ADAPTER_FILE
    if not path.exists():
        raise GGUFConversionError(f"{adapter_dir} has no {ADAPTER_FILE}")
    tensors = load_file(str(path))
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    pairs = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                raise GGUFConversionError(f"the adapter holds {key}, which a GGUF LoRA cannot carry: export it "
                                          "as `merged`")
            continue
        module = re.sub(r"^(base_model\.model\.)+", "", key.split(".lora_A.")[0])
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise GGUFConversionError(f"the adapter has {key} without its lora_B")
        r = next((int(v) for k, v in ranks.items() if module.endswith(k)), rank)
        al = next((float(v) for k, v in alphas.items() if module.endswith(k)), alpha)
        scale = al / math.sqrt(r) if config.get("use_rslora") else al / r
        pairs[module] = (a.astype(np.float32), b.astype(np.float32) * scale)
    if not pairs:
        raise GGUFConversionError(f"{adapter_dir} holds no LoRA weights")
    return pairs


def gguf_pairs(adapter_dir: str | Path, base: BaseInfo) -> dict[str, tuple]:
    """GGUF tensor name (blk.0.attn_q.weight) -> (A, B·scale) in the base GGUF's layout."""
    import gguf

    archs = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if base.arch not in archs:
        raise GGUFConversionError(f"the gguf package does not know the architecture {base.arch!r}")
    names = gguf.get_tensor_name_map(archs[base.arch], base.n_blocks)
    out = {}
    for module, (a, b) in lora_pairs(adapter_dir).items():
        name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or name not in base.shapes:
            raise GGUFConversionError(f"the adapter changes {module}, which the base GGUF has no tensor for")
        rows, cols = base.shapes[name]
        if (b.shape[0], a.shape[1]) != (rows, cols):
            raise GGUFConversionError(f"{module}: the adapter is for a {b.shape[0]}×{a.shape[1]} weight, the base "
                                      f"GGUF's {name} is {rows}×{cols}: not the model it was trained on")
        if base.arch in PERMUTED_ARCHS and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = base.n_head if name.endswith("attn_q.weight") else base.n_head_kv
            b = permute_rows(b, heads)
        out[name] = (a, b)
    return out


def write_adapter_gguf(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path, *,
                       dtype: str = "f32") -> Path:
    """The adapter as a llama.cpp LoRA GGUF (f32 or f16 tensors) for the base model `base_gguf`."""
    import gguf
    import numpy as np

    if dtype not in ("f32", "f16"):
        raise GGUFConversionError(f"adapter tensors are f32 or f16, not {dtype}")
    base = read_base(base_gguf)
    pairs = gguf_pairs(adapter_dir, base)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: scale 1, the scale is in B already
    cast = np.float16 if dtype == "f16" else np.float32
    for name in sorted(pairs):
        a, b = pairs[name]
        stem = name.removesuffix(".weight")
        writer.add_tensor(f"{stem}.weight.lora_a", np.ascontiguousarray(a, dtype=cast))
        writer.add_tensor(f"{stem}.weight.lora_b", np.ascontiguousarray(b, dtype=cast))
    return _write(writer, tmp, out)


def _write(writer, tmp: Path, out: Path) -> Path:
    """Write the file under a temporary name, then move it in place: a half-written GGUF is never `out`."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


MERGED_TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_1": "Q4_1", "q4_0": "Q4_0", "same": None}


def write_merged_gguf(adapter_dir: str | Path, base_gguf: str | Path, out: str | Path, *,
                      quant: str = "q8_0") -> Path:
    """The base GGUF with the adapter folded into its weights: one file that any llama.cpp runtime loads.

    Tensors the adapter changes are dequantized, changed (W + s·B·A) and written as `quant` (`same`: the type
    they had, where the gguf package can write it, else Q8_0); every other tensor and all metadata are copied.
    """
    import gguf
    import numpy as np

    if quant not in MERGED_TYPES:
        raise GGUFConversionError(f"unknown GGUF type {quant!r}; choose one of {', '.join(MERGED_TYPES)}")
    base = read_base(base_gguf)
    pairs = gguf_pairs(adapter_dir, base)
    reader = gguf.GGUFReader(str(base_gguf))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), base.arch)
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
    for key, field in reader.fields.items():
        if key in skip:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), kind)
    writable = {gguf.GGMLQuantizationType[t] for t in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")}
    for tensor in reader.tensors:
        if tensor.name not in pairs:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
            continue
        a, b = pairs[tensor.name]
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        weight = weight.reshape(base.shapes[tensor.name]) + b @ a
        target = MERGED_TYPES[quant]
        qtype = gguf.GGMLQuantizationType[target] if target else tensor.tensor_type
        if qtype not in writable:
            qtype = gguf.GGMLQuantizationType.Q8_0
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, weight)
        else:
            data = gguf.quants.quantize(weight, qtype)
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
    return _write(writer, tmp, out)

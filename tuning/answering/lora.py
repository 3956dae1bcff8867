"""Switching LoRA adapters on one shared base model: peft's layers pointed at the active adapter (no module
walk per request), a lean forward for plain LoRA linears, loading with a clean roll-back, LRU eviction."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tuning.answering.requests import AdapterLoadError

log = logging.getLogger(__name__)

def _lean_lora_forward(self, x, *args, **kwargs):
    """peft's LoRA Linear forward with one plain adapter, as the same operations without peft's per-call checks.

    `_tunebot_lora` is (A, B, scaling) of the active adapter, None for the base model (or a layer the adapter
    does not touch), False to fall back to peft's own forward (DoRA and other variants, biases).
    """
    import torch.nn.functional as F

    lora = self._tunebot_lora
    if lora is False or args or kwargs or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if lora is None:
        return result
    a, b, scaling = lora
    return result + F.linear(F.linear(x, a), b) * scaling  # peft: result + lora_B(lora_A(dropout(x))) * scaling


def _lean_lora_state(layer, name: str | None):
    """What _lean_lora_forward needs for this layer and adapter (see there)."""
    import torch

    if name is None or name not in layer.lora_A:
        return None
    a, b = layer.lora_A[name], layer.lora_B[name]
    if (name in getattr(layer, "lora_variant", {}) or a.bias is not None or b.bias is not None
            or not isinstance(layer.lora_dropout[name], (torch.nn.Identity, torch.nn.Dropout))):
        return False
    return (a.weight, b.weight, layer.scaling[name])


def _remove_injected_layers(model) -> None:
    """Put back the original layers wherever peft wrapped one (LoRA and other tuner layers, modules_to_save)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    wrappers = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    wrapped = [name for name, module in model.named_modules() if isinstance(module, wrappers)]
    for name in wrapped:
        if any(name.startswith(outer + ".") for outer in wrapped):
            continue  # inside another wrapper: goes with it
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child)
        original = module.original_module if isinstance(module, AuxiliaryTrainingWrapper) else module.get_base_layer()
        setattr(parent, child, original)
    if hasattr(model, "peft_config"):
        del model.peft_config


class AdapterSlots:
    """The adapter half of the torch Engine: `_peft` (None until the first adapter), `_adapters` (folder ->
    name, LRU first), `_active`; mixed into Engine."""

    def _use_base(self, batch) -> None:
        """Answer with the base model: LoRA layers point at no adapter (peft's disable_adapter walks every module)."""
        if self._peft is None:
            return
        start = time.perf_counter()
        if self._aux:  # modules_to_save are switched off by peft's own context
            batch.context.enter_context(self._peft.disable_adapter())
        self._switch(None)
        self.last_switch_ms = (time.perf_counter() - start) * 1000

    def _use_adapter(self, adapter_dir: str) -> None:
        """Make this adapter the active one, loading it (and evicting the least recently used) if needed."""
        start = time.perf_counter()
        from tuning.artifacts import is_remote, local_dir

        if is_remote(adapter_dir):  # an adapter in a shared store (s3://, memory://, …): a cached local copy
            adapter_dir = str(local_dir(adapter_dir, cache_dir=self.cache_dir))
        key = str(Path(adapter_dir).expanduser().resolve())
        name = self._adapters.get(key)
        if name is None:
            if not (Path(key) / "adapter_config.json").exists():
                log.warning("no adapter_config.json in %s", key)
                raise AdapterLoadError(f"the adapter {Path(key).name!r} is not a LoRA adapter folder "
                                       "(no adapter_config.json)", code="adapter_unavailable")
            name = f"adapter{next(self._names)}"
            self._load_adapter(key, name)
            config = self._peft.peft_config[name]
            self._aux = self._aux or bool(getattr(config, "modules_to_save", None) or
                                          getattr(config, "trainable_token_indices", None))
            self._lora_layers = None
            self._active = ""  # the new adapter's layers were just added: point every layer again
            self.adapter_loads += 1
            self._adapters[key] = name
        self._adapters.move_to_end(key)
        if name != self._active:
            self._switch(name)
        self.last_switch_ms = (time.perf_counter() - start) * 1000
        while len(self._adapters) > self.adapter_cache_size:
            _, old = self._adapters.popitem(last=False)
            self._peft.delete_adapter(old)
            self._lora_layers = None
            self.adapter_evictions += 1

    def _load_adapter(self, folder: str, name: str) -> None:
        """Load an adapter under `name`; when that fails, take out what peft had already injected (raising
        AdapterLoadError), so the base model and the other adapters answer exactly as before."""
        grads = [(p, p.requires_grad) for p in self.model.parameters()] if self._peft is None else []
        try:
            if self._peft is None:
                from peft import PeftModel

                # low_cpu_mem_usage: the weights are created empty and filled from the file, not initialised.
                self._peft = PeftModel.from_pretrained(self.model, folder, adapter_name=name, low_cpu_mem_usage=True)
                self._peft.eval()
            else:
                self._peft.load_adapter(folder, adapter_name=name, low_cpu_mem_usage=True)
        except Exception as exc:  # safetensors, peft and torch raise many types for a missing or damaged file
            log.warning("cannot load the adapter in %s: %s: %s", folder, type(exc).__name__, exc)
            if self._peft is None:  # from_pretrained wraps the shared model's layers before it reads the weights
                _remove_injected_layers(self.model)
                for param, requires_grad in grads:
                    param.requires_grad_(requires_grad)
            elif name in self._peft.peft_config:
                try:
                    self._peft.delete_adapter(name)
                except Exception:
                    log.exception("cannot remove the half-loaded adapter %s", name)
            self._lora_layers = None
            self._active = ""  # every layer is pointed again by the next request, whichever model it asks for
            raise AdapterLoadError(f"the adapter {Path(folder).name!r} cannot be loaded: its files are missing or "
                                   "damaged (the server log has the details)", code="adapter_unavailable") from exc

    def _switch(self, name: str | None) -> None:
        """Activate a resident adapter (None: no adapter) by pointing each LoRA layer at it.

        peft's set_adapter also walks every module and toggles requires_grad on every resident adapter, which
        grows with the number of adapters (~250 ms with 20 on this CPU); inference needs only the pointer.
        Plain LoRA linears also get a lean forward (the same operations as peft's, without its per-call checks).
        """
        if self._lora_layers is None:
            import types

            from peft.tuners.lora.layer import Linear as LoraLinear
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._lora_layers = [m for m in self._peft.modules() if isinstance(m, BaseTunerLayer)]
            for layer in self._lora_layers:
                if type(layer) is LoraLinear and not layer.fan_in_fan_out and "forward" not in vars(layer):
                    layer.forward = types.MethodType(_lean_lora_forward, layer)
        if self._aux and name is not None:  # modules_to_save / trainable tokens: peft's full walk
            self._peft.set_adapter(name)
        elif not self._aux:
            if name is not None:
                self._peft.base_model.active_adapter = name
        for layer in self._lora_layers:
            if not self._aux:
                layer._active_adapter = [name] if name is not None else []
            if "forward" in vars(layer):
                layer._tunebot_lora = _lean_lora_state(layer, name)
        self._active = name

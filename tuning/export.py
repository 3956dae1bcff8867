"""Exporting a tuned model to run elsewhere, checked before it is handed over.

Formats: `adapter` (the peft folder), `merged` (safetensors with the LoRA folded in, tokenizer and chat template),
`gguf` (one llama.cpp file with the LoRA folded in, plus the LoRA as a GGUF adapter for the original base GGUF),
`ollama` (a folder with that GGUF and a Modelfile: TEMPLATE rendered from the chat template, the stop tokens, the
system prompt). Each export is loaded in its target runtime (transformers, or llama.cpp for gguf and ollama) and
asked the probe questions; the answers are compared with the torch engine's greedy answers of the version, and
an export that disagrees beyond tolerance is flagged in its report (`export_report.json`).

The probes are closed book (the plain question with the system prompt): an exported model has no retriever.
Given what the chat answers to them (`chat`, grounded), the report also says how many of them each gets right,
in the user's words: what leaves here is the closed-book model; `tuning.export_assistant` exports what the chat
answers with.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from tuning.errors import TuningError

FORMATS = ("adapter", "merged", "gguf", "ollama")
MIN_SAME = 0.8  # below this share of identical answers an export is flagged (unless accuracy held)
ACCURACY_SLACK = 0.05  # ... or when its must_contain accuracy falls more than this below the reference
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_config.json", "grounding.json",
                 "fewshot_pool.jsonl", "training_report.json")


class ExportError(TuningError):
    """An export that cannot be made as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class Probe:
    question: str
    must_contain: tuple[str, ...] = ()
    answer: str = ""  # the approved answer: scores a probe without must_contain (the whole answer must appear)


@dataclass
class Check:
    """One handed-over artifact asked the probes in its runtime."""

    artifact: str
    runtime: str
    same: int
    accuracy: float | None
    flagged: bool
    disagreements: list[dict] = field(default_factory=list)


@dataclass
class ExportReport:
    format: str
    path: str
    files: list[str]
    probes: int
    reference_accuracy: float | None
    checks: list[Check]
    seconds: float
    note: str = ""
    scored: int = 0  # probes that can be scored (must_contain, or an approved answer)
    closed_book_right: int | None = None  # of them, right closed book: the export's main artifact in its runtime
    closed_book_artifact: str = ""  # that artifact (model.gguf, …)
    grounded_right: int | None = None  # ... and right as the chat answers (grounded, "I don't know" counts wrong)

    @property
    def flagged(self) -> bool:
        return any(c.flagged for c in self.checks)

    @property
    def same(self) -> int:
        """Identical answers of the least faithful artifact."""
        return min((c.same for c in self.checks), default=0)

    def summary(self) -> str:
        lines = [f"{self.format} export in {self.path} (written in {self.seconds:.0f} s)"]
        for c in self.checks:
            acc = ("" if self.reference_accuracy is None else
                   f"; must_contain accuracy {c.accuracy:.0%} (the torch engine: {self.reference_accuracy:.0%})")
            verdict = "FLAGGED: it does not answer like the tuned model" if c.flagged else "ok"
            lines.append(f"  {c.artifact} in {c.runtime}: same answer on {c.same} of {self.probes} probe "
                         f"questions{acc}: {verdict}")
        if not self.checks:
            lines.append("  not checked (no probe questions)")
        if self.grounded_right is not None:
            lines.append("  " + self.comparison())
        return "\n".join(lines)

    def comparison(self) -> str:
        """How the exported (closed-book) model scores beside the chat's grounded answers, in the user's words."""
        advice = (" — to answer like the chat, export --format assistant" if self.grounded_right > self.closed_book_right
                  else "")
        return (f"closed book ({self.closed_book_artifact}, what this export answers with): {self.closed_book_right} of "
                f"{self.scored} probe questions right; grounded (as the chat answers): {self.grounded_right} of "
                f"{self.scored}{advice}")


def chatml_template(chat_template: str) -> bool:
    return "<|im_start|>" in (chat_template or "") and "<|im_end|>" in (chat_template or "")


OLLAMA_TEMPLATE = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                   "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")


def render_ollama_template(template: str, values: dict[str, str]) -> str:
    """What Ollama sends the model for one turn: `{{ if .X }}…{{ end }}` blocks (not nested) and `{{ .X }}` values
    of a Go template, up to where the answer (`.Response`) begins."""
    text = template.split("{{ .Response }}")[0]
    text = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m.group(2) if values.get(m.group(1)) else "",
                  text, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m.group(1), ""), text)


def system_prompt_for(tokenizer, system_prompt: str) -> str:
    """The system prompt the chat template actually uses: the given one, else the template's own default."""
    if system_prompt:
        return system_prompt
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                        add_generation_prompt=True)
    start = "<|im_start|>system\n"
    return text.split(start, 1)[1].split("<|im_end|>", 1)[0] if start in text else ""


def modelfile(tokenizer, *, gguf_name: str, system_prompt: str, stop_tokens: Sequence[str],
              adapter_name: str | None = None) -> str:
    """An Ollama Modelfile for a ChatML model (TEMPLATE, stop parameters, SYSTEM), greedy like the probes."""
    if not chatml_template(tokenizer.chat_template):
        raise ExportError("the Ollama export writes ChatML templates (<|im_start|> … <|im_end|>), and this model's "
                          "chat template is another: export `gguf` and write the Modelfile's TEMPLATE by hand")
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f'TEMPLATE """{OLLAMA_TEMPLATE}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    lines.append("PARAMETER temperature 0")
    system = system_prompt_for(tokenizer, system_prompt)
    if system:
        lines.append('SYSTEM """' + system.replace('"""', '"\u200b""') + '"""')
    return "\n".join(lines) + "\n"


def _accuracy(probes: Sequence[Probe], answers: Sequence[str]) -> float | None:
    from tuning.evaluate import contains_all

    checked = [(p, a) for p, a in zip(probes, answers) if p.must_contain]
    if not checked:
        return None
    return sum(contains_all(a, p.must_contain) for p, a in checked) / len(checked)


def probe_right(probe: Probe, answer: str) -> bool | None:
    """Whether an answer is right: it holds every must_contain token, else the whole approved answer; None when
    the probe has neither."""
    from tuning.scoring import contains_all, normalize

    if probe.must_contain:
        return contains_all(answer, probe.must_contain)
    return normalize(probe.answer) in normalize(answer) if probe.answer.strip() else None


def _answers(engine, probes: Sequence[Probe], *, system_prompt: str, adapter_dir: str | None,
             max_new_tokens: int) -> list[str]:
    from tuning.prompts import build_messages

    pending = [engine.submit(build_messages(p.question, system_prompt=system_prompt), adapter_dir=adapter_dir,
                             max_new_tokens=max_new_tokens, temperature=0.0) for p in probes]
    return [g.result().text.strip() for g in pending]


def export_model(adapter_dir: str | Path, *, base_model: str, out_dir: str | Path, fmt: str,
                 probes: Sequence[Probe] = (), system_prompt: str = "", cache_dir: str | Path | None = None,
                 quant: str = "q8_0", max_new_tokens: int = 48,
                 chat: Callable[[object, Sequence[str]], list[str]] | None = None) -> ExportReport:
    """Write `fmt` into out_dir, check it on `probes` against the torch engine, and save export_report.json.
    chat(torch engine, questions): what the chat answers them (grounded), scored beside the closed-book answers."""
    from tuning.answering.engine import Engine

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json): nothing to export")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty: choose a new folder, so that nothing is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    note = ""
    if fmt == "adapter":
        for name in ADAPTER_FILES:
            if (adapter_dir / name).exists():
                shutil.copy2(adapter_dir / name, out / name)
        if (adapter_dir / "retrieval").is_dir():
            shutil.copytree(adapter_dir / "retrieval", out / "retrieval")
        targets = [("adapter", "transformers + peft", Engine(base_model, cache_dir=cache_dir), str(out))]
    elif fmt == "merged":
        _write_merged(adapter_dir, base_model, out, cache_dir=cache_dir)
        targets = [("merged model", "transformers", Engine(str(out)), None)]
    else:
        targets, note = _write_gguf(adapter_dir, base_model, out, fmt, system_prompt=system_prompt,
                                    cache_dir=cache_dir, quant=quant)
    seconds_written = time.perf_counter() - started
    checks: list[Check] = []
    reference: list[str] = []
    grounded: list[str] = []
    closed: dict = {}
    try:
        if probes:
            torch_engine = Engine(base_model, cache_dir=cache_dir)
            try:
                reference = _answers(torch_engine, probes, system_prompt=system_prompt,
                                     adapter_dir=str(adapter_dir), max_new_tokens=max_new_tokens)
                if chat is not None:
                    grounded = chat(torch_engine, [p.question for p in probes])
            finally:
                torch_engine.close()
        for artifact, runtime, engine, adapter in targets:
            if probes:
                answers = _answers(engine, probes, system_prompt=system_prompt, adapter_dir=adapter,
                                   max_new_tokens=max_new_tokens)
                checks.append(_check(artifact, runtime, probes, reference, answers))
                if not closed:  # the main artifact's answers are what a user of this export gets
                    closed = {"closed_book_artifact": artifact, **_closed_beside_grounded(probes, answers, grounded)}
    finally:
        for _, _, engine, _ in targets:
            engine.close()
    files = sorted({p.name for p in out.iterdir()} | {"export_report.json"})
    report = ExportReport(format=fmt, path=str(out), files=files, probes=len(probes),
                          reference_accuracy=_accuracy(probes, reference), checks=checks,
                          seconds=round(seconds_written, 1), note=note,
                          **(closed if "scored" in closed else {}))
    (out / "export_report.json").write_text(json.dumps({**asdict(report), "flagged": report.flagged}, indent=2,
                                                       ensure_ascii=False))
    return report


def _closed_beside_grounded(probes: Sequence[Probe], closed: Sequence[str], grounded: Sequence[str]) -> dict:
    """How many scorable probes the closed-book answers and the chat's grounded answers get right."""
    if not grounded:
        return {}
    rows = [(probe_right(p, c), probe_right(p, g)) for p, c, g in zip(probes, closed, grounded)]
    rows = [r for r in rows if r[0] is not None]
    if not rows:
        return {}
    return {"scored": len(rows), "closed_book_right": sum(c for c, _ in rows), "grounded_right": sum(g for _, g in rows)}


def _check(artifact: str, runtime: str, probes: Sequence[Probe], reference: Sequence[str],
           answers: Sequence[str]) -> Check:
    """Identical answers and must_contain accuracy against the torch engine's; flagged beyond tolerance."""
    same = sum(a == b for a, b in zip(answers, reference))
    ref_acc, acc = _accuracy(probes, reference), _accuracy(probes, answers)
    # Accuracy can excuse different wording only where the tuned model answers some probes right.
    held = bool(ref_acc) and acc is not None and acc >= ref_acc - ACCURACY_SLACK
    return Check(artifact=artifact, runtime=runtime, same=same, accuracy=acc,
                 flagged=not (same >= MIN_SAME * len(probes) or held),
                 disagreements=[{"question": p.question, "torch": r, "export": a}
                                for p, r, a in zip(probes, reference, answers) if r != a][:10])


def _write_merged(adapter_dir: Path, base_model: str, out: Path, *, cache_dir) -> None:
    """merge_and_unload into the base weights (float32), saved as safetensors with the tokenizer."""
    from peft import PeftModel

    from tuning.models import load_base_model

    model, tokenizer = load_base_model(base_model, cache_dir=cache_dir)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_gguf(adapter_dir: Path, base_model: str, out: Path, fmt: str, *, system_prompt: str, cache_dir,
                quant: str):
    """model.gguf (merged) and adapter.gguf (for the original base GGUF), each checked in llama.cpp; for ollama
    a Modelfile too, whose template is checked to render the prompt exactly as the chat template does."""
    from tuning.answering.llamacpp import LlamaCppEngine, base_gguf
    from tuning.lora_gguf import write_adapter_gguf, write_merged_gguf

    try:
        base = base_gguf(base_model)
    except TuningError as exc:
        raise ExportError(f"GGUF export needs a GGUF base model (bundled:… or a .gguf file): {exc}. Export "
                          "`merged` and convert it with llama.cpp's convert_hf_to_gguf.py") from None
    write_merged_gguf(adapter_dir, base, out / "model.gguf", quant=quant)
    write_adapter_gguf(adapter_dir, base, out / "adapter.gguf")
    note = f"model.gguf: the base GGUF with the LoRA folded in ({quant} where it changed); adapter.gguf: the LoRA " \
           f"alone, for {base.name} (llama.cpp --lora, Ollama ADAPTER)"
    engine = LlamaCppEngine(str(out / "model.gguf"), tokenizer_model=base_model, cache_dir=cache_dir)
    pair = LlamaCppEngine(base_model, cache_dir=cache_dir)
    targets = [("model.gguf", "llama.cpp", engine, None),
               (f"adapter.gguf on {base.name}", "llama.cpp", pair, str(out / "adapter.gguf"))]
    if fmt == "ollama":
        engine.load()
        tokenizer = engine.tokenizer  # the base model's, the one it was trained with
        stops = sorted({tokenizer.convert_ids_to_tokens(i) for i in engine.stop_ids})
        (out / "Modelfile").write_text(modelfile(tokenizer, gguf_name="model.gguf", system_prompt=system_prompt,
                                                 stop_tokens=stops))
        # The same for the adapter on the original base GGUF (what fits a message; the base file is the user's).
        (out / "Modelfile.adapter").write_text(modelfile(tokenizer, gguf_name=base.name, system_prompt=system_prompt,
                                                         stop_tokens=stops, adapter_name="adapter.gguf"))
        system = system_prompt_for(tokenizer, system_prompt)
        question = "What is the probe?"
        expected = tokenizer.apply_chat_template(
            [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": question}],
            tokenize=False, add_generation_prompt=True)
        if render_ollama_template(OLLAMA_TEMPLATE, {"System": system, "Prompt": question}) != expected:
            raise ExportError("the Modelfile's TEMPLATE would not render the prompt as the model's chat template "
                              "does; export `gguf` and write the TEMPLATE by hand")
        note += "; Modelfile: `ollama create NAME -f Modelfile` in this folder (TEMPLATE checked against the chat " \
                "template)"
    return targets, note

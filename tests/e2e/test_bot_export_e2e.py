"""/export for llama.cpp and Ollama in Telegram: owners only, checked before it is sent, in the owner's language."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import zipfile

import pytest
from inprocess import InProcessBot
from texts_check import latin_noise

from tuning.jobs.versions import register_candidate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600),
              pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")]
OWNER, EXPERT = 9301, 9302
BUNDLED = "bundled:smollm2-135m"


def gentle_adapter(model_dir: str, out) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(out)
    return str(out)


def test_owner_gets_a_checked_gguf_adapter_and_an_expert_cannot(emulator, tmp_path, bundled_model_dir, model_cache):
    bot = InProcessBot(emulator, tmp_path / "data", max_new_tokens=16)
    try:
        store = bot.store
        acme = store.create_assistant("severo", owner_id=OWNER, base_model=BUNDLED, system_prompt="Отвечай кратко.")
        store.add_member(acme.id, EXPERT, "expert")
        for q, a in (("Сколько стоит доставка?", "300 рублей."), ("Когда открыт склад?", "С 8 до 20.")):
            store.add_example(acme.id, q, a, status="approved")
        adapter = gentle_adapter(bundled_model_dir, tmp_path / "v1")
        job = store.create_job("train", assistant_id=acme.id)
        version = register_candidate(store, acme.id, job_id=job.id, adapter_path=adapter, base_model=BUNDLED,
                                     dataset_hash="h", hyperparameters={}, metrics={})
        store.activate_version(version.id)
        for user in (OWNER, EXPERT):
            bot.user_data(user)["assistant_id"] = acme.id

        menu = bot.ask(EXPERT, "/export", language="ru")[-1]
        assert "xm:gguf" not in json.dumps(menu.buttons)  # experts export data, not models
        assert "нужна роль «владелец»" in bot.press(EXPERT, "xm:gguf", language="ru")[-1].text  # a crafted tap: refused
        menu = bot.ask(OWNER, "/export", language="ru")[-1]
        assert "🦙 Модель для llama.cpp / Ollama" in menu.button_texts

        replies = bot.press(OWNER, "xm:gguf", language="ru")
        texts = [m.text for m in replies]
        assert texts[0].startswith("⏳ Выгружаю версию #") and "на 2 вопросах" in texts[0]
        [sent] = [m for m in replies if m.document]
        names = set(zipfile.ZipFile(io.BytesIO(emulator.bot_file(sent.document["file_id"]))).namelist())
        assert names == {"adapter.gguf", "Modelfile.adapter", "export_report.json"}
        done = texts[-1]
        assert "проверена в llama.cpp" in done and "model.gguf: тот же ответ, что у обученной модели без ваших " \
            "примеров, на" in done, done
        assert "adapter.gguf: тот же ответ" in done and "из 2 вопросов" in done
        # the model alone beside /chat (grounded in the examples), scored on the approved answers
        compare = re.search(r"Верных ответов на 2 ваших вопросов: (\d) у этого файла .* (\d) в /chat", done)
        assert compare is not None, done
        assert "tunebot export-model --assistant severo --format assistant" in done
        modelfile = zipfile.ZipFile(io.BytesIO(emulator.bot_file(sent.document["file_id"]))).read("Modelfile.adapter")
        assert modelfile.decode().startswith("FROM ./SmolLM2-135M-Instruct.Q4_1.gguf\nADAPTER ./adapter.gguf\n")
        noise = [latin_noise(t, ["severo", "llama.cpp", "ollama create ИМЯ -f Modelfile.adapter", "Modelfile.adapter",
                                 "tunebot export-model --assistant severo --format assistant"])
                 for t in texts]
        assert noise == [[]] * len(texts), noise
        assert bot.errors == []
    finally:
        bot.close()

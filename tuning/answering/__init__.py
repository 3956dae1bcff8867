"""Answering, in the order a question flows: `service` plans an answer (mode, retrieved examples, prompt) and
records it; an engine decodes it (`engine`: torch, batched per adapter (`batch`) with `lora`'s adapter switching;
`llamacpp`: llama.cpp; `remote`: an OpenAI-compatible endpoint), all behind `requests`' submit() -> Generation;
`api` serves it over HTTP."""

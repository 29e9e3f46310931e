"""The model's own chat template (from the GGUF), rendered in a sandboxed Jinja environment."""

from __future__ import annotations

from .runtime import LlamaRuntime

# Used only when a GGUF carries no template: ChatML, which both small test models understand.
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatTemplate:
    """Renders [system, user] into the exact prompt text the model was trained on."""

    def __init__(self, template: str, bos: str, eos: str) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # Jinja2ChatFormatter renders in jinja2's ImmutableSandboxedEnvironment
        self._formatter = Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos)

    @classmethod
    def from_runtime(cls, rt: LlamaRuntime) -> ChatTemplate:
        template = rt.meta("tokenizer.chat_template") or CHATML
        bos_id = rt.lib.llama_vocab_bos(rt.vocab)
        eos_id = rt.lib.llama_vocab_eos(rt.vocab)
        bos = rt.token_text(bos_id) if bos_id >= 0 else ""
        eos = rt.token_text(eos_id) if eos_id >= 0 else ""
        return cls(template, bos, eos)

    def render(self, system: str, user: str, assistant_prefix: str = "") -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return self._formatter(messages=messages).prompt + assistant_prefix

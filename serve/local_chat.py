"""One-shot local generation: base model + one LoRA adapter, in this process.

Used by ``persona chat`` (and ``make run``) to print a persona's answer
without any server. Takes paths, not registry objects, so ``serve`` stays
independent of ``train``.
"""

from __future__ import annotations

from serve.protocol import CHAT_REPETITION_PENALTY


def generate_reply(base: str, adapter_path: str | None, system_prompt: str, message: str,
                   max_new_tokens: int = 96, temperature: float = 0.0,
                   repetition_penalty: float = CHAT_REPETITION_PENALTY) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path)
    model.eval()
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": message}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 0.95} if temperature > 0 else {
        "do_sample": False}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

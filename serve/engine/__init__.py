"""Engines that serve the base model and LoRA adapters over vLLM's OpenAI protocol."""

"""Training: persona data, recipes, SFT runs, evaluation and the adapter registry.

Training is a pure step: files in, an adapter folder plus metrics out. torch,
transformers, peft and trl are imported inside the functions that use them.
"""

"""Stable Diffusion + LoRA: the cross-domain study's generator (prompt sets over fine-tuned identities).

- :mod:`.tokenizer`: a CLIP tokenizer without a hub (open-clip-torch's BPE file).
- :mod:`.checkpoint`: the base text-to-image pipeline, from a local folder or hub id, or a tiny random-weight
  one saved to a folder and loaded through the same ``from_pretrained``.
- :mod:`.prompts`: prompt sets (people with attributes x templates with ids), ``configs/prompts/*.yaml``.
- :mod:`.lora`: the LoRA adapters (peft) and their diffusers-format weights file.
- :mod:`.train_data`: training images (a shard dataset or an image folder) prepared once, and the step-indexed
  batch order that makes a resume exact.
- :mod:`.finetune`: the ``finetune_lora`` job on Ray Train.
- :mod:`.generator`: the generation-stage generator (batched pipeline calls, one torch.Generator per row).
"""

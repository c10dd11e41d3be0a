"""Pure-PyTorch fine-tuning: data, ViT backbones, LoRA, optimisation, metrics. Usable without Ray."""

"""Pure-PyTorch fine-tuning: data, ViTs, LoRA, optimisation, metrics. Usable without Ray."""

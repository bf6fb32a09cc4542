"""The SSB services: teacher (vLLM engine), curator (steps 1-5), trainer (LoRA KL distillation), evaluation."""

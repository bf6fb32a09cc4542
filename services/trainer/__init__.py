"""The trainer: LoRA distillation of the hinted teacher into the bare-question student (step 6 of SSB)."""

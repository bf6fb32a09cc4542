"""The teacher: a vLLM engine on the base model, and provisioning of the default model."""

"""Network definitions, checkpoint I/O (safetensors + JSON card) and training loops."""

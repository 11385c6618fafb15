"""Bytes in and out: input-file policy, safetensors windows and writer, the one unpickling policy,
torch's zip writer, atomic outputs."""

"""Phi-4-Multimodal: the Phi-4-mini decoder with vision and speech encoders and one LoRA adapter per modality."""

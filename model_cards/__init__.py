"""Jinja templates for the README.md (model card) of WEMoE artifacts, rendered with huggingface_hub.ModelCard."""

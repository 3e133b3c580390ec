"""The model stage: texts rendered for a model, its hidden states extracted and cached."""

"""The network: AlexNet's two towers (network), its presets, the grouped reference, the model file.

Knows nothing of Ray, data or storage. Import the modules themselves: this package imports nothing, so
reading a preset or a model file's metadata does not pay for torch.
"""

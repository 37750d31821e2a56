"""Using trained models: classify images, plot learning curves."""

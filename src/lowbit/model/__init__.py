"""Model sources, target selection and the quantized-model representation."""

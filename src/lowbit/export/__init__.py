"""Exporters: each serialises a QuantizedModel; none quantizes on its own."""

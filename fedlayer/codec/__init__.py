"""The codec stage between every strategy and the wire, in both directions (``codec.*``)."""

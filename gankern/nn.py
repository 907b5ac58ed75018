"""PLACEHOLDER (foundation commit): drop-in layers land with the layers issue."""

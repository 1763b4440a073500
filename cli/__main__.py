"""``python -m scribeline ...`` runs the same command as ``scribeline ...``."""

from scribeline.main import app

app()

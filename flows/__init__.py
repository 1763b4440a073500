"""scribeline.flows: Prefect flows that orchestrate generation, training and export."""

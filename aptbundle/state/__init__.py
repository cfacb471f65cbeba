"""State: saving and restoring complete training state inside a run (the checkpointer)."""

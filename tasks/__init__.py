"""hook's build pipeline: plain Python stages that dodo.py wires into doit tasks."""

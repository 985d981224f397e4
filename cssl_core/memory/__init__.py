"""Stage 3, memory: the versioned replay memory and how frames are selected into it."""

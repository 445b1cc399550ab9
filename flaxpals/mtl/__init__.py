"""Multi-task learning as optax transformations: per-task gradient combiners (PCGrad and
the rest), loss weightings, the task sampler and the masks that keep other tasks' parameters."""

"""meshlane: the composition root (CLI, control plane, node agent, ztunnel entry, lab)."""

"""pytest plugin (fixtures arrive with the golden suite)."""

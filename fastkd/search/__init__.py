"""Layer-mapping search: a genetic algorithm over mappings, scored in a cheap proxy setting."""

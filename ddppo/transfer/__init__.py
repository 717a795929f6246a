"""Transfer experiments and representation similarity (DESIGN.md §7)."""

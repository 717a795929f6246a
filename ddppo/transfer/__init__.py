"""Transfer experiments and representation similarity (docs/design.md, "Representation similarity")."""

"""The embedded renderer's shading, shared by both renderers (and by the scene export, which paints the same
ceiling)."""

SIDE_SHADE = (1.0, 0.78)  # faces whose normal runs along x, along z
ATTENUATION = 0.04  # brightness 1 / (1 + ATTENUATION * depth)
STRIPE = 2.5  # wall stripes per metre
CHECKER = 2.0  # floor checks per metre
CEILING_RGB = (205.0, 205.0, 210.0)
UNDER_WALL_RGB = 110.0

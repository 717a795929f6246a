"""The constants of the forward move, shared by both ``step`` twins (docs/design.md, "Kinematics")."""

COLLISION_EPS = 1e-5
"""m²: a forward move collided when the square of the distance it covered fell short of the full step's by more than
this, habitat-sim's own rule (its ``ObjectControls`` compares squared lengths before and after the navmesh filter)."""
STAND_TOLERANCE = 1e-5
"""Metres of clearance below the agent radius still counted as room to stand: spares float32 rounding of a point
projected onto the boundary, so that both twins take the same decisions."""
SLIDE_ITERATIONS = 4
"""Newton steps that project a blocked target onto the boundary, at most: the clearance is bilinear, so one step
lands on a straight wall exactly; round a box's corner, where the interpolated gradient is shorter than 1, the third
lands within float32 rounding and the fourth is to spare."""
MIN_GRADIENT2 = 0.25
"""A target whose clearance gradient is flatter than this (squared, metres per metre) is not projected: on a ridge
between two walls the gradient names no direction, and a Newton step there would overshoot."""
MAX_SLIDE_PUSH = 2.0
"""A projected target is kept only when it lies within this many sub-steps of the blocked target. The closest point
of the free space can lie up to about twice as far from the target as the sub-step's start does (round a corner of
radius r the projection stretches arcs by up to r / (r - sub-step)); what this rules out is a jump to the far side of
a wall, whose free spaces lie at least two radii plus a cell apart."""

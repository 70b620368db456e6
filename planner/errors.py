"""The planner's errors. Every message says what is wrong in the user's terms."""

from __future__ import annotations


class PlannerError(Exception):
    """Base of the planner's errors."""


class PlannerInfeasible(PlannerError):
    """No plan exists: the nodes cannot hold the model (the message says by how much)."""


class SolverUnavailable(PlannerError):
    """glpsol was not found (next to the Python interpreter, nor on PATH)."""


class SolverFailed(PlannerError):
    """The solver ran but gave no usable answer (crashed, or no plan within the time limit)."""


class ScenarioError(PlannerError):
    """A scenario file is unreadable or invalid; the message names the file and the field."""

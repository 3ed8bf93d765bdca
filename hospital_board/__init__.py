"""The emergency department's big-screen board: who is coming, how sick, when, live.

Public surface: :func:`create_app` and :class:`BoardSettings` (the service), :class:`BoardState` (the pure model
other packages or tests may drive), and the wire models of :mod:`hospital_board.state`.
"""

from hospital_board.main import BoardRuntime, create_app
from hospital_board.settings import BoardSettings
from hospital_board.state import BoardSnapshot, BoardState, CardPublic

__all__ = ["BoardRuntime", "BoardSettings", "BoardSnapshot", "BoardState", "CardPublic", "create_app"]

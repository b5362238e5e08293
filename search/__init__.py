"""Tree search for w2s-agents (installed as ``w2s_agents.search``).

MCTS over trajectory trees, node values, and extraction of best paths and preference pairs. This package
never imports torch. Import it as ``w2s_agents.search``, never as ``search``.
"""

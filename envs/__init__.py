"""Text environments for w2s-agents (installed as ``w2s_agents.envs``).

Environments follow the contract of DESIGN section 7: ``gymnasium.Env[str, str]`` with reward = change of
normalised score, ``info`` carrying admissible commands and the outcome, and ``clone_state()`` /
``restore_state()`` for tree search. Import this package as ``w2s_agents.envs``, never as ``envs``.
"""

"""Text environments for w2s-agents (installed as ``w2s_agents.envs``).

Environments follow the contract of DESIGN section 7: ``gymnasium.Env[str, str]`` with reward = change of
normalised score, ``info`` carrying admissible commands and the outcome, and ``clone_state()`` /
``restore_state()`` for tree search. Import this package as ``w2s_agents.envs``, never as ``envs``.
"""

from w2s_agents.envs.registration import make_env, register_env, register_envs, registered_envs

__all__ = ["make_env", "register_env", "register_envs", "registered_envs"]

register_envs()

"""Fine-tuning of agents for w2s-agents (installed as ``w2s_agents.trainers``).

SFT, TreeDPO and MCTS-SFT on conversational rows extracted from searched trees. Import this package as
``w2s_agents.trainers``, never as ``trainers``.
"""

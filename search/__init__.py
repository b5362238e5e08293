"""Tree search for w2s-agents (installed as ``w2s_agents.search``).

MCTS over trajectory trees (offline, the paper's; online expansion with env clones and a policy prior),
node values, and extraction of best paths and preference pairs. This package never imports torch. Import it
as ``w2s_agents.search``, never as ``search``.
"""

from .extract import (
    best_path_row,
    context_messages,
    continuation_messages,
    expert_failure_pairs,
    tree_pairs,
    unique_rows,
    write_jsonl,
)
from .mcts import (
    MCTSResult,
    SearchConfig,
    ValueKind,
    backup,
    best_child,
    best_path,
    max_values,
    mcts_values,
    mean_values,
    node_values,
    run_mcts,
    search_tree,
    select_child,
    success_values,
    tie_orders,
    ucb_score,
)
from .online import (
    OnlineResult,
    OnlineSearchConfig,
    Policy,
    PolicyOutput,
    Proposal,
    SearchEnv,
    expand_online,
    puct_score,
)

__all__ = [
    "MCTSResult",
    "OnlineResult",
    "OnlineSearchConfig",
    "Policy",
    "PolicyOutput",
    "Proposal",
    "SearchConfig",
    "SearchEnv",
    "ValueKind",
    "backup",
    "best_child",
    "best_path",
    "best_path_row",
    "context_messages",
    "continuation_messages",
    "expand_online",
    "expert_failure_pairs",
    "max_values",
    "mcts_values",
    "mean_values",
    "node_values",
    "puct_score",
    "run_mcts",
    "search_tree",
    "select_child",
    "success_values",
    "tie_orders",
    "tree_pairs",
    "ucb_score",
    "unique_rows",
    "write_jsonl",
]

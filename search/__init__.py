"""Tree search for w2s-agents (installed as ``w2s_agents.search``; never imports torch).

==============  ======================================================================================
``stats``       search statistics (N, W, Q) and the selection rules every search shares: UCB, PUCT, backup
``mcts``        the paper's offline MCTS over a fixed tree ("tree -> values")
``online``      online PUCT expansion with an env and a policy prior (beyond the paper)
``values``      node values (search, mean, max, success) and the greedy best path
``extract``     training data from searched trees: best-path SFT rows, TreeDPO pairs ("tree -> pairs")
``rows``        the typed rows (:class:`SftRow`, :class:`PairRow`): the one writer and reader of row files
==============  ======================================================================================

Import it as ``w2s_agents.search``, never as ``search``.
"""

from .extract import (
    best_path_row,
    context_messages,
    continuation_messages,
    expert_failure_pairs,
    tree_pairs,
)
from .mcts import MCTSResult, SearchConfig, run_mcts, search_tree, tie_orders
from .online import (
    OnlineResult,
    OnlineSearchConfig,
    Policy,
    PolicyOutput,
    Proposal,
    SearchEnv,
    expand_online,
)
from .rows import (
    PAIR_LEVELS,
    PairRow,
    RowsInput,
    SftRow,
    iter_jsonl,
    read_pairs,
    read_sft_rows,
    unique_rows,
    write_rows,
)
from .stats import SearchStats, backup, puct_score, select_child, ucb_score
from .values import (
    ValueKind,
    best_child,
    best_path,
    leaf_values,
    max_values,
    mcts_values,
    mean_values,
    node_values,
    search_values,
    success_values,
)

__all__ = [
    "PAIR_LEVELS",
    "MCTSResult",
    "OnlineResult",
    "OnlineSearchConfig",
    "PairRow",
    "Policy",
    "PolicyOutput",
    "Proposal",
    "RowsInput",
    "SearchConfig",
    "SearchEnv",
    "SearchStats",
    "SftRow",
    "ValueKind",
    "backup",
    "best_child",
    "best_path",
    "best_path_row",
    "context_messages",
    "continuation_messages",
    "expand_online",
    "expert_failure_pairs",
    "iter_jsonl",
    "leaf_values",
    "max_values",
    "mcts_values",
    "mean_values",
    "node_values",
    "puct_score",
    "read_pairs",
    "read_sft_rows",
    "run_mcts",
    "search_tree",
    "search_values",
    "select_child",
    "success_values",
    "tie_orders",
    "tree_pairs",
    "ucb_score",
    "unique_rows",
    "write_rows",
]

"""Tree search for w2s-agents (installed as ``w2s_agents.search``; never imports torch).

==============  ======================================================================================
``stats``       search statistics (N, W, Q) and the selection rules every search shares: UCB, PUCT, backup
``mcts``        the paper's offline MCTS over a fixed tree ("tree -> values")
``online``      online PUCT expansion with an env and a policy prior (beyond the paper)
``values``      node values (search, mean, max, success) and the greedy best path
``extract``     training data from searched trees: best-path SFT rows, TreeDPO pairs ("tree -> pairs")
``paths``       best paths without detours: state graph, loop erasure, stitching, replay verification
``rows``        the typed rows (:class:`SftRow`, :class:`PairRow`): the one writer and reader of row files
==============  ======================================================================================

Import it as ``w2s_agents.search``, never as ``search``.
"""

from .extract import (
    best_path_row,
    context_messages,
    continuation_messages,
    expert_failure_pairs,
    path_row,
    tree_pairs,
    tree_rows,
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
from .paths import (
    PathChoice,
    PathOutcome,
    StateGraph,
    choose_path,
    env_replayer,
    is_tree_path,
    loop_erase,
    replay_path,
    stitched_path,
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
    "PathChoice",
    "PathOutcome",
    "Policy",
    "PolicyOutput",
    "Proposal",
    "RowsInput",
    "SearchConfig",
    "SearchEnv",
    "SearchStats",
    "SftRow",
    "StateGraph",
    "ValueKind",
    "backup",
    "best_child",
    "best_path",
    "best_path_row",
    "choose_path",
    "context_messages",
    "continuation_messages",
    "env_replayer",
    "expand_online",
    "expert_failure_pairs",
    "is_tree_path",
    "iter_jsonl",
    "leaf_values",
    "loop_erase",
    "max_values",
    "mean_values",
    "node_values",
    "path_row",
    "puct_score",
    "read_pairs",
    "read_sft_rows",
    "replay_path",
    "run_mcts",
    "search_tree",
    "search_values",
    "select_child",
    "stitched_path",
    "success_values",
    "tie_orders",
    "tree_pairs",
    "tree_rows",
    "ucb_score",
    "unique_rows",
    "write_rows",
]

"""The stage functions of the pipeline, one module per stage or family of stages.

Every stage is a module-level function whose first argument is the
:class:`~w2s_agents.pipeline.cache.StageContext` (its folder and the folders of the stages before it), followed
by what it needs of the experiment; :func:`w2s_agents.pipeline.runner.build_stages` binds those with
``functools.partial`` and declares each stage's config part and dependencies.

Stage, module, function::

    tasks, held-out, demos                      tasks.py     run_tasks, run_held_out, run_demos
    models, models-<name>                       models.py    run_models, run_weak_model
    weak-sft, strong-sft, weak-sft-<name>       train.py     run_sft
    w2s-mcts                                    train.py     run_mcts_sft
    w2s-treedpo, w2s-mcts-treedpo, ceiling      train.py     run_dpo
    explore, explore-<name>, trees              explore.py   run_explore, run_trees
    strong-explore, eto, best-of-n              baselines.py run_strong_explore, run_eto, run_best_of_n
    expand                                      expand.py    run_expand
    search                                      search.py    run_search
    rl-search-r<k>, w2s-rl-r<k>                 rl.py        run_rl_search, run_pg
    eval                                        eval.py      run_eval (the work: pipeline/evaluate.py)

With ``run.rounds`` > 1 the stages of rounds 2 .. N (``explore-r<k>``, ``trees-r<k>``, ``expand-r<k>``,
``search-r<k>``, ``w2s-*-r<k>``) run the functions of their round-1 stages, bound to the round's data by
:func:`w2s_agents.pipeline.rounds.later_round_stages`. With ``rl.rounds`` > 0 the RL rounds' ``rl-explore-r<k>`` and
``rl-trees-r<k>`` run the explore and trees functions, bound by :func:`w2s_agents.pipeline.rl.rl_round_stages`.

What several stages share (files of earlier stages, agents, episodes, validation) is in
:mod:`w2s_agents.pipeline.stage_io`.
"""

from .baselines import run_best_of_n, run_eto, run_strong_explore
from .eval import run_eval
from .expand import run_expand
from .explore import run_explore, run_trees
from .models import run_models, run_weak_model
from .rl import run_pg, run_rl_search
from .search import run_search
from .tasks import run_demos, run_held_out, run_tasks
from .train import run_dpo, run_mcts_sft, run_sft

__all__ = [
    "run_best_of_n",
    "run_demos",
    "run_dpo",
    "run_eto",
    "run_eval",
    "run_expand",
    "run_explore",
    "run_held_out",
    "run_mcts_sft",
    "run_models",
    "run_pg",
    "run_rl_search",
    "run_search",
    "run_sft",
    "run_strong_explore",
    "run_tasks",
    "run_trees",
    "run_weak_model",
]

"""Keys of actions and observations in trajectory trees, and the texts a node shows.

Steps merge on keys: an action's key is its normalised text (:func:`normalize_text`), an observation's is
``tree.obs_key`` of its text (the normalised text by default). Keys are interned (equal keys are one object)
and cached per raw text, and the tree keeps, per key, the smallest raw text seen with it: the text its nodes
show, so that it does not depend on the order trajectories were added in.

Observation keys are settled lazily. A node keeps the first raw text seen after its action (``_otext``), and
the key of a child holds, for the observation its action was chosen on, the token :data:`FIRST_SEEN` when that
observation has the key of the parent's first text, else the observation's own key. A step whose observation
equals the node's first text (nearly every step of a deterministic game) thus needs no key at all: the token
says "same as the first text" whatever that text's key is. A key is computed only when a text differs from
the node's first one (:func:`other_text`), when a reader asks for a key, and for every text not yet keyed when
a text is first read (:func:`settle_texts`, which also registers the texts shown). The merges, the node ids and
the saved files are those of keying every observation at once: two observations after the same node get the
same token exactly when their keys are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tree import TrajectoryTree

ObservationKey = Callable[[str], Hashable]
"""Maps an observation to the key steps merge on: a pure function (it is called once per distinct text, when
the key is first needed); keys must be hashable and mutually orderable."""


# ASCII text as bytes: whitespace (what str.split() splits on: \t \n \v \f \r, \x1c-\x1f, space) to spaces,
# capitals to small letters
_ASCII_KEY = bytes.maketrans(
    b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1fABCDEFGHIJKLMNOPQRSTUVWXYZ", b"         abcdefghijklmnopqrstuvwxyz"
)


def normalize_text(text: str) -> str:
    """Strip, lowercase and collapse runs of whitespace to one space (the default action and observation key).

    Returns ``" ".join(text.split()).lower()``. ASCII text (game text nearly always is) takes a faster way to
    the same result: one byte translation for the case and the whitespace, then a split at the double spaces
    only, which are few, rather than at every space."""
    if text.isascii():
        parts = text.encode("ascii").translate(_ASCII_KEY).split(b"  ")
        return b" ".join([p for p in map(bytes.strip, parts) if p]).decode("ascii")
    return " ".join(text.split()).lower()


# Ellipsis: a singleton that no key function returns (observation_key refuses it) and that the garbage collector
# does not track, so that key tuples holding it are untracked like the others (a tracked token would give the
# collector one object per node to walk); it also pickles as itself
FIRST_SEEN: Any = ...
"""Observation token of a child key: the observation acted on has the key of the parent's first text."""


def action_key(tree: TrajectoryTree, raw: str) -> str:
    """The key of an action text not seen before: cached, and the smallest spelling of the key kept."""
    key = normalize_text(raw)
    old = tree._action_text.get(key)
    if old is None or raw < old:
        tree._action_text[key] = raw
    tree._akc[raw] = key
    return key


def observation_key(tree: TrajectoryTree, raw: str) -> Any:
    """The key of an observation text not keyed before: interned, cached, and the smallest text of the key kept."""
    key = tree.obs_key(raw)
    if key is FIRST_SEEN:
        raise ValueError(f"obs_key returned Ellipsis (the tree's own token) for the observation {raw[:80]!r}")
    key = tree._obs_intern.setdefault(key, key)
    old = tree._obs_text.get(key)
    if old is None or raw < old:
        tree._obs_text[key] = raw
    tree._okc[raw] = key
    return key


def first_key(tree: TrajectoryTree, node: int) -> Any:
    """The key of the first observation text seen after ``node``'s action (computed once per text)."""
    raw = tree._otext[node]
    key = tree._okc.get(raw)
    return observation_key(tree, raw) if key is None else key


def key_before(tree: TrajectoryTree, node: int) -> Any:
    """The key of the observation ``node``'s action was chosen on (None for the root)."""
    token = tree._key[node][2]
    return first_key(tree, tree._parent[node]) if token is FIRST_SEEN else token


def other_text(tree: TrajectoryTree, node: int, raw: str) -> Any:
    """A step reached ``node`` with the observation ``raw``, which is not the node's first text: returns the token
    of that observation for the key of the next step's node, and keeps the node's shown key the smallest seen."""
    key = tree._okc.get(raw)
    if key is None:
        key = observation_key(tree, raw)
    first = first_key(tree, node)
    if key is first:  # interned: equal keys are one object
        return FIRST_SEEN
    shown = tree._oka[node]
    if shown is None:
        shown = first
    tree._oka[node] = key if key < shown else shown
    return key


def settle_texts(tree: TrajectoryTree) -> None:
    """Key every first text not keyed yet, so that each node's shown key (``_oka``) is set and each key's shown
    text is the smallest raw text of it in the tree. Texts are read through this; it costs one pass over the
    nodes added since the last call (all nodes after a renumbering)."""
    n = len(tree._key)
    if tree._settled_below >= n:
        return
    oka, otext, okc = tree._oka, tree._otext, tree._okc
    for node in range(tree._settled_below, n):
        if oka[node] is None:
            raw = otext[node]
            if raw is not None:  # None: the root of an empty tree
                key = okc.get(raw)
                oka[node] = observation_key(tree, raw) if key is None else key
    tree._settled_below = n

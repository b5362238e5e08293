"""The world state of an Inform 7 story, read from Z-machine memory: what identifies a TextWorld game state.

TextWorld compiles its games with Inform 7 (build 6M62) to Z-machine version 8 story files. Jericho's own
world-state hash needs per-game bindings that TextWorld games lack (it hashes an empty object list, the same
for every state), so :class:`WorldLayout` reads the object table itself. What counts, per object:

* its **parent** in the object tree: where every thing is (a room, a container, a supporter, the player's
  hands); siblings and children are left out, since their order only says in which order things were put
  somewhere;
* its **attributes** (Inform 7's either/or properties: open, locked, switched on, worn, TextWorld's cooked,
  burned, ...) except the template's history and scratch bits: ``moved`` (= handled), ``visited``,
  ``mentioned``, ``privately_named`` (the list writer's filter), ``workflag`` and ``workflag2``. Text
  generated for TextWorld games depends on none of them;
* its **property values** (Inform 7's value properties: TextWorld's type of cooking and of cutting, ...)
  except individual properties longer than one word: Inform 7's action bitmaps (which actions were ever
  applied to the object, history) and constant arrays.

Globals (the turn counter, the parser's buffers, the random generator) are not read; the env adds the score.
The layout (which bytes to read) is fixed for a story file, so it is computed once per game and a state's
bytes are one gather from memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["SCRATCH_ATTRIBUTES", "WorldLayout"]

# Attribute numbers of the Inform 7 (6M62) template, Definitions.i6t, which declares them in this order
# starting at 0 (absent = 0, animate = 1, ...).
SCRATCH_ATTRIBUTES: dict[str, int] = {
    "moved": 11,  # I7 "handled": the player once carried it
    "visited": 21,  # the player was once in the room
    "privately_named": 30,  # reused as list_filter_permits by the list writer
    "mentioned": 31,  # set while a room description is printed
    "workflag": 35,  # list writer workspace
    "workflag2": 36,
}
"""Attributes that record history or serve as workspace, left out of the world state."""

_ATTRIBUTE_BYTES = 6  # 48 attributes in Z-machine versions 4 and later
_ENTRY_BYTES = 14  # attributes, parent, sibling, child (words), property table address (word)
_DEFAULTS_BYTES = 63 * 2  # property defaults table before the first object entry
_INDIVIDUAL_TABLE_PROPERTY = 3  # Inform 6 stores the address of an object's individual properties there


def _attribute_mask() -> bytes:
    mask = bytearray(b"\xff" * _ATTRIBUTE_BYTES)
    for number in SCRATCH_ATTRIBUTES.values():
        mask[number // 8] &= ~(0x80 >> (number % 8)) & 0xFF
    return bytes(mask)


@dataclass(frozen=True, eq=False)
class WorldLayout:
    """Which bytes of a story's dynamic memory hold its world state, and which of their bits count.

    Build it with :meth:`read` from the memory of a running story; :meth:`state_bytes` then gives the world
    state of any later memory of the same story.
    """

    index: np.ndarray
    """Byte addresses in dynamic memory, in a fixed order (objects, then their properties)."""
    mask: np.ndarray
    """Per address, the bits that count (scratch attributes cleared)."""
    objects: int
    """Number of objects in the object table."""

    @classmethod
    def read(cls, memory: bytes | np.ndarray) -> WorldLayout:
        """The layout of the story whose dynamic memory is ``memory``.

        Raises:
            ValueError: the memory is not that of a Z-machine version 4+ story with a readable object table.
        """
        ram = bytes(memory)
        try:
            return cls._read(ram)
        except (IndexError, struct.error) as exc:
            raise ValueError(f"unreadable Z-machine object table: {exc}") from None

    @classmethod
    def _read(cls, ram: bytes) -> WorldLayout:
        if len(ram) < 64 or ram[0] < 4:
            raise ValueError(f"not a Z-machine story of version 4 or later (version byte {ram[:1].hex()})")
        entry = struct.unpack_from(">H", ram, 0x0A)[0] + _DEFAULTS_BYTES
        attr_mask = _attribute_mask()
        index: list[int] = []
        mask = bytearray()
        tables: list[int] = []
        first_table = len(ram)
        # property tables follow the object table, so the first of them marks where the entries end
        while entry + _ENTRY_BYTES <= first_table:
            table = struct.unpack_from(">H", ram, entry + 12)[0]
            if not entry < table < len(ram):
                raise ValueError(f"object {len(tables) + 1} has its property table at {table}")
            first_table = min(first_table, table)
            index.extend(range(entry, entry + _ATTRIBUTE_BYTES + 2))  # attributes and parent
            mask += attr_mask + b"\xff\xff"
            tables.append(table)
            entry += _ENTRY_BYTES
        if not tables:
            raise ValueError("the object table is empty")
        for table in tables:
            for number, at, length in _properties(ram, table):
                if number != _INDIVIDUAL_TABLE_PROPERTY:
                    index.extend(range(at, at + length))
                    mask += b"\xff" * length
                    continue
                for at2, length2 in _individual_properties(ram, struct.unpack_from(">H", ram, at)[0]):
                    if length2 <= 2:  # longer ones are action bitmaps (history) and constant arrays
                        index.extend(range(at2, at2 + length2))
                        mask += b"\xff" * length2
        addresses = np.array(index, dtype=np.intp)
        if addresses.max() >= len(ram):
            raise ValueError(f"a property value lies beyond dynamic memory ({addresses.max()} >= {len(ram)})")
        return cls(addresses, np.frombuffer(bytes(mask), dtype=np.uint8), len(tables))

    def state_bytes(self, memory: np.ndarray) -> bytes:
        """The world state in ``memory`` (dynamic memory of the same story, as a ``uint8`` array)."""
        return (memory[self.index] & self.mask).tobytes()


def _properties(ram: bytes, table: int) -> list[tuple[int, int, int]]:
    """``(number, address of the value, length)`` of every common property in the table at ``table``."""
    out = []
    at = table + 1 + 2 * ram[table]  # after the short name (length in words, then text)
    while size := ram[at]:
        number = size & 0x3F
        if size & 0x80:
            length = ram[at + 1] & 0x3F or 64
            at += 2
        else:
            length = 2 if size & 0x40 else 1
            at += 1
        out.append((number, at, length))
        at += length
    return out


def _individual_properties(ram: bytes, table: int) -> list[tuple[int, int]]:
    """``(address of the value, length)`` of every Inform 6 individual property in the table at ``table``
    (entries: identifier word, length byte, value; a zero word ends the table)."""
    out = []
    while struct.unpack_from(">H", ram, table)[0]:
        length = ram[table + 2]
        out.append((table + 3, length))
        table += 3 + length
    return out

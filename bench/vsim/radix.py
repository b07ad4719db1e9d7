"""An approximate character-level radix tree shared by several tenants (workers).

RE-IMPLEMENTATION, written for this simulator from the public description and source of
the sglang-router / vllm-router `cache_aware` policy (sgl-router `src/policies/tree.rs`):
one tree per model; every routed request's text is inserted under the worker it went to;
a node remembers, per worker, when it was last used; `prefix_match` walks the text as
deep as the tree goes and answers one worker holding the deepest node reached (theirs
takes the first key of a concurrent hash map, i.e. an arbitrary holder: here a seeded
random one); `smallest_tenant` is the worker with the fewest characters in the tree;
periodic eviction trims each worker to a character budget, least recently used leaves
first. Not their code: behaviour only.
"""

from __future__ import annotations

import heapq
import random


class _Node:
    __slots__ = ("children", "parent", "tenants", "text")

    def __init__(self, text: str, parent: _Node | None) -> None:
        self.text = text
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.tenants: dict[str, float] = {}  # worker -> last access (model seconds)


def _shared(a: str, b: str, start: int) -> int:
    """Length of the common prefix of `a` and `b[start:]`."""
    if b.startswith(a, start):
        return len(a)
    lo, hi = 0, min(len(a), len(b) - start)
    while lo < hi:  # largest k with a[:k] == b[start:start+k]
        mid = (lo + hi + 1) // 2
        if b.startswith(a[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class ApproxTree:
    def __init__(self, rng: random.Random) -> None:
        self.root = _Node("", None)
        self.char_count: dict[str, int] = {}
        self.rng = rng

    def add_tenant(self, tenant: str, now: float = 0.0) -> None:
        self.root.tenants[tenant] = now
        self.char_count.setdefault(tenant, 0)

    def insert(self, text: str, tenant: str, now: float) -> None:
        self.add_tenant(tenant, now)
        counts = self.char_count
        curr = self.root
        i, n = 0, len(text)
        while i < n:
            child = curr.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], curr)
                leaf.tenants[tenant] = now
                curr.children[text[i]] = leaf
                counts[tenant] += n - i
                return
            shared = _shared(child.text, text, i)
            if shared < len(child.text):
                mid = _Node(child.text[:shared], curr)
                mid.tenants = dict(child.tenants)
                child.text = child.text[shared:]
                child.parent = mid
                mid.children[child.text[0]] = child
                curr.children[text[i]] = mid
                child = mid
            if tenant not in child.tenants:
                counts[tenant] += len(child.text)
            child.tenants[tenant] = now
            curr = child
            i += shared

    def prefix_match(self, text: str, now: float) -> tuple[int, str | None]:
        """(matched characters, a worker holding the deepest node reached)."""
        curr = self.root
        i, n = 0, len(text)
        while i < n:
            child = curr.children.get(text[i])
            if child is None:
                break
            shared = _shared(child.text, text, i)
            i += shared
            curr = child
            if shared < len(child.text):
                break
        if not curr.tenants:
            return i, None
        holders = list(curr.tenants)
        tenant = holders[0] if len(holders) == 1 else self.rng.choice(holders)
        node: _Node | None = curr
        while node is not None:
            node.tenants[tenant] = now
            node = node.parent
        return i, tenant

    def smallest_tenant(self, tenants: list[str]) -> str:
        counts = self.char_count
        least = min(counts.get(t, 0) for t in tenants)
        ties = [t for t in tenants if counts.get(t, 0) == least]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)

    def evict_by_size(self, max_chars: int) -> None:
        """Trim every worker to `max_chars`, least recently used leaves first."""
        over = {t for t, c in self.char_count.items() if c > max_chars}
        if not over:
            return
        heap: list[tuple[float, int, str, _Node]] = []
        seq = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            for t, ts in node.tenants.items():
                if t in over and node is not self.root and not any(
                    t in c.tenants for c in node.children.values()
                ):
                    heap.append((ts, seq, t, node))
                    seq += 1
        heapq.heapify(heap)
        while heap:
            _, _, t, node = heapq.heappop(heap)
            if self.char_count[t] <= max_chars or t not in node.tenants:
                continue
            del node.tenants[t]
            self.char_count[t] -= len(node.text)
            parent = node.parent
            if not node.tenants and not node.children and parent is not None:
                del parent.children[node.text[0]]
            if (
                parent is not None and parent is not self.root and t in parent.tenants
                and not any(t in c.tenants for c in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[t], seq, t, parent))
                seq += 1

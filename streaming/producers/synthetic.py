"""A seeded synthetic event stream with structure a model can learn: history predicts behavior.

World
    Items belong to categories; each category has a centroid in a small latent space and each item sits
    near its category's centroid, with a popularity that follows a Zipf law.
    Each user has a base interest vector plus a *per-scenario* offset (what they look for on the home feed
    differs from what they search for), and the interests drift slowly with time (a random walk per
    user session). Users' activity is Zipf-distributed.
Behaviors
    A user session picks a scenario, then draws items from a softmax over affinity = interest_s . item +
    popularity + a short-term boost for the categories of the user's last few items. Most are views; the
    chance of click/cart/buy grows with affinity. Search sessions carry a query: the name of the session's
    most-liked category.
Impressions
    Requests show ``slate`` candidates (half from the user's interests, half popular/random) at positions
    0..N-1. A hidden model decides clicks: sigmoid(affinity + position bias). Clicks are behaviors with the
    request_id, arriving after a random delay; ``late_click_rate`` of them arrive long after (for the joiner's
    late-click path). Events come out in event-time order.

Nothing is held per event: state is O(users x scenarios x dim) arrays plus a small heap of pending clicks,
so millions of events stream in constant memory.

    from streaming.producers.synthetic import SyntheticConfig, SyntheticStream
    for event in SyntheticStream(SyntheticConfig(users=500, events=10_000)):
        ...
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator

import numpy as np
from pydantic import BaseModel, Field

from schemas.events import BehaviorEvent, ImpressionEvent

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: a fixed origin keeps runs reproducible


class SyntheticConfig(BaseModel):
    users: int = Field(1000, ge=1, le=50_000_000, description="number of users")
    items: int = Field(5000, ge=10, le=50_000_000, description="number of items")
    categories: int = Field(50, ge=2, le=100_000, description="number of item categories")
    scenarios: tuple[str, ...] = Field(("home", "search", "detail"), description="where behaviors happen")
    events: int = Field(100_000, ge=0, description="total events (behaviors + impressions) to emit")
    seed: int = Field(0, description="everything is reproducible from this")
    dim: int = Field(8, ge=2, le=64, description="latent dimension of the hidden interest model")
    scenario_strength: float = Field(1.0, ge=0, description="how far per-scenario interests depart from the base")
    drift: float = Field(0.05, ge=0, description="interest random-walk step per session")
    temperature: float = Field(0.5, gt=0, description="softmax temperature of item choice (lower: more predictable)")
    session_length: int = Field(8, ge=1, description="mean behaviors per session")
    impression_share: float = Field(0.5, ge=0, le=1, description="share of sessions that are impression requests")
    slate: int = Field(10, ge=1, le=100, description="candidates per impression request")
    click_bias: float = Field(-4.0, description="click logit offset (sets the base CTR)")
    click_scale: float = Field(0.7, description="how strongly affinity drives clicks")
    late_click_rate: float = Field(0.01, ge=0, le=1, description="share of clicks that arrive very late")
    late_click_delay_ms: int = Field(3_600_000, ge=0, description="delay of late clicks")
    click_delay_ms: int = Field(15_000, ge=0, description="mean delay of normal clicks")
    duplicate_rate: float = Field(0.0, ge=0, le=1, description="share of behaviors emitted twice (producer retries)")
    mean_gap_ms: float = Field(1000.0, gt=0, description="mean event-time gap between sessions")
    start_ms: int = Field(START_MS, description="event time of the first event")


class SyntheticStream:
    """Iterate to get ``BehaviorEvent``s and ``ImpressionEvent``s in event-time order."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        rng = self.rng = np.random.default_rng(cfg.seed)
        c, d = cfg.categories, cfg.dim
        self.centroids = rng.normal(size=(c, d)) / np.sqrt(d) * 2.0
        self.item_cat = rng.integers(0, c, size=cfg.items)
        self.item_vec = (self.centroids[self.item_cat] + rng.normal(scale=0.4 / np.sqrt(d), size=(cfg.items, d)))
        self.item_vec = self.item_vec.astype(np.float32)
        ranks = rng.permutation(cfg.items) + 1
        self.item_pop = (-0.8 * np.log(ranks)).astype(np.float32)  # Zipf-like log popularity
        self.item_pop -= self.item_pop.mean()
        s = len(cfg.scenarios)
        self.base = (rng.normal(size=(cfg.users, d)) / np.sqrt(d) * 2.0).astype(np.float32)
        self.offset = (rng.normal(size=(cfg.users, s, d)) / np.sqrt(d) * 2.0 * cfg.scenario_strength).astype(np.float32)
        act = 1.0 / (np.arange(cfg.users) + 10.0) ** 0.7
        self.activity = np.cumsum(rng.permutation(act / act.sum()))
        self.recent: dict[int, deque[int]] = {}
        self.user_ids = rng.permutation(cfg.users * 7 + 13)[: cfg.users] + 1  # non-contiguous ids, like real ones
        self.item_ids = rng.permutation(cfg.items * 5 + 7)[: cfg.items] + 1

    def interest(self, u: int, s: int) -> np.ndarray:
        return self.base[u] + self.offset[u, s]

    def affinity(self, u: int, s: int, items: np.ndarray) -> np.ndarray:
        """The hidden affinity of user u in scenario s for items (by index): what history reveals."""
        a = self.item_vec[items] @ self.interest(u, s) + 0.3 * self.item_pop[items]
        recent = self.recent.get(u)
        if recent:
            cats = {int(self.item_cat[i]) for i in recent}
            a = a + 0.5 * np.isin(self.item_cat[items], list(cats))
        return a

    def __iter__(self) -> Iterator[BehaviorEvent | ImpressionEvent]:
        # Every generated event goes through a heap and leaves once the generation clock has passed its
        # time: sessions only ever generate events at or after the clock, so the output is time-ordered.
        cfg, rng = self.cfg, self.rng
        now = cfg.start_ms
        heap: list[tuple[int, int, BehaviorEvent | ImpressionEvent]] = []
        emitted = seq = req = 0
        pool_size = min(cfg.items, 256)  # a candidate pool per session keeps a draw O(pool), not O(items)

        def push(event: BehaviorEvent | ImpressionEvent) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(heap, (event.event_time_ms, seq, event))

        while emitted < cfg.events:
            now += int(rng.exponential(cfg.mean_gap_ms)) + 1
            while heap and heap[0][0] <= now and emitted < cfg.events:
                yield heapq.heappop(heap)[2]
                emitted += 1
            u = min(int(np.searchsorted(self.activity, rng.random())), cfg.users - 1)
            s = int(rng.integers(len(cfg.scenarios)))
            scen = cfg.scenarios[s]
            self.base[u] += rng.normal(scale=cfg.drift / np.sqrt(cfg.dim), size=cfg.dim).astype(np.float32)
            uid = int(self.user_ids[u])
            pool = np.unique(rng.integers(0, cfg.items, size=pool_size))
            if rng.random() < cfg.impression_share:
                req += 1
                rid = f"req-{cfg.seed}-{req}"
                k = cfg.slate
                top = pool[np.argsort(-self.affinity(u, s, pool))[: k // 2]]  # "retrieval": half relevant
                rest = np.setdiff1d(pool, top)
                slate = np.concatenate([top, rng.choice(rest, size=min(k - len(top), len(rest)), replace=False)])
                k = len(slate)
                rng.shuffle(slate)
                query = self._query(slate) if scen == "search" else None
                logit = cfg.click_bias + cfg.click_scale * self.affinity(u, s, slate) - 0.3 * np.log1p(np.arange(k))
                p_click = 1 / (1 + np.exp(-logit))
                for pos, (i, p) in enumerate(zip(slate, p_click)):
                    item, t = int(i), now + pos
                    push(ImpressionEvent(request_id=rid, user_id=uid, item_id=int(self.item_ids[item]),
                                         category_id=int(self.item_cat[item]), position=pos, scenario=scen,
                                         query=query, event_time_ms=t))
                    if rng.random() < p:
                        late = rng.random() < cfg.late_click_rate
                        delay = cfg.late_click_delay_ms if late else int(rng.exponential(cfg.click_delay_ms)) + 1
                        push(BehaviorEvent(event_id=f"syn-{cfg.seed}-{seq}c", user_id=uid,
                                           item_id=int(self.item_ids[item]), category_id=int(self.item_cat[item]),
                                           behavior="click", scenario=scen, query=query, request_id=rid,
                                           event_time_ms=t + delay))
                        self._remember(u, item)
            else:
                n = max(1, int(rng.poisson(cfg.session_length)))
                query = None
                a = self.affinity(u, s, pool)  # once per session: the short-term boost is the session's start
                p = np.exp((a - a.max()) / cfg.temperature)
                choices = rng.choice(len(pool), size=n, p=p / p.sum())
                for j, choice in enumerate(choices):
                    item = int(pool[choice])
                    if scen == "search" and query is None:
                        query = f"cat{int(self.item_cat[item])}"
                    strength = 1 / (1 + np.exp(-float(a[choice])))
                    r = rng.random()
                    behavior = ("buy" if r < 0.03 * strength else "cart" if r < 0.08 * strength
                                else "click" if r < 0.2 * strength else "view")
                    event = BehaviorEvent(event_id=f"syn-{cfg.seed}-{seq}", user_id=uid, item_id=int(self.item_ids[item]),
                                          category_id=int(self.item_cat[item]), behavior=behavior, scenario=scen,
                                          query=query, event_time_ms=now + j * 1000)
                    push(event)
                    if cfg.duplicate_rate and rng.random() < cfg.duplicate_rate:
                        push(event)  # a producer retry: same event_id, same time
                    self._remember(u, item)
        # The stream stops at cfg.events; events still in the heap past that point are not emitted.

    def _query(self, slate: np.ndarray) -> str:
        return f"cat{int(np.bincount(self.item_cat[slate]).argmax())}"

    def _remember(self, u: int, item: int) -> None:
        self.recent.setdefault(u, deque(maxlen=5)).append(item)

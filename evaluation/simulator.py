"""A synthetic shopping world with a known user model, so that the best achievable reward is known.

The catalogue looks like Tmall's: every item has a category ``"top-sub"``, a brand, a seller and a
title, plus a hidden latent vector ``v_i`` built from its top category, sub category and brand
(so the hashed metadata features of :class:`memento.encoder.ItemEncoder` carry real signal) and a
hidden base appeal ``b_i``. Every user has a hidden unit taste vector ``u``. With the match
``m = <u, v_i>``:

* ``P(click | u, i) = sigmoid(affinity * m + b_i + click_bias)``;
* given a click, the user collects with ``sigmoid(collect_affinity * m + collect_bias)``, puts the
  item in the cart with ``sigmoid(cart_affinity * m + cart_bias)`` and, given the cart, buys it
  with ``sigmoid(purchase_affinity * m + purchase_appeal * b_i + purchase_bias)``.

The reward of an item is the largest :class:`memento.config.RewardWeights` weight among the
actions taken on it (0 without a click), so :meth:`SyntheticWorld.expected_reward` is exact and
:meth:`SyntheticWorld.oracle_item` is the best achievable recommendation. Users also browse on
their own (items drawn by a softmax over their click score), which is what builds their history,
and their tastes drift toward what they consume:
``u <- normalise(u + drift_eta * v_i + drift_anchor * u_0)`` with ``u_0`` the initial taste.

A *taste shift* (:meth:`SyntheticWorld.shift_tastes`, applied by
:class:`evaluation.replay.SyntheticSource` before request moment ``shift_at_moment``) moves every
user to a new taste drawn as initial tastes are, ``u <- normalise((1 − s)·u + s·u_new)`` with
``s = shift_strength``, and makes it the taste drift is anchored to: the best items change
mid-stream, and stay changed.

>>> import numpy as np
>>> world = SyntheticWorld(WorldConfig(n_items=40, n_users=5), seed=1)
>>> rng = np.random.default_rng(0)
>>> user = world.user_ids[0]
>>> best = world.oracle_item(user)
>>> world.oracle_reward(user) >= max(world.expected_reward(user, i) for i in world.item_ids)
True
>>> set(world.respond(user, best, rng)) <= {"click", "collect", "cart", "purchase"}
True
"""

from __future__ import annotations

import calendar
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from memento.config import RewardWeights
from memento.encoder import HistoryEntry, ItemEncoder, ItemMeta, StateEncoder

__all__ = ["WorldConfig", "SyntheticWorld", "reference_policy_rewards", "SYNTHETIC_EPOCH"]

# Event time at which synthetic logs start: 2014-09-01 00:00 UTC, the month of the Tmall log.
SYNTHETIC_EPOCH = float(calendar.timegm((2014, 9, 1, 0, 0, 0)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass(frozen=True)
class WorldConfig:
    """Every parameter of the synthetic world.

    Parameters
    ----------
    n_items
        Catalogue size.
    n_users
        Number of users.
    n_top_categories, n_sub_categories
        Categories are ``"top-sub"`` with ``top`` in 1..n_top_categories and ``sub`` in
        1..n_sub_categories (Tmall's shape, e.g. ``"2-7"``).
    n_brands, n_sellers
        Brands belong to one top category each; sellers are independent of taste.
    latent_dim
        Dimension of the hidden taste/item space.
    top_weight, sub_weight, brand_weight, item_noise
        An item's latent vector is ``normalise(top_weight*top + sub_weight*sub +
        brand_weight*brand + item_noise*noise)`` of random unit directions.
    null_brand_share
        Share of items without brand (Tmall writes the literal ``null``).
    user_categories
        Number of top categories a user's initial taste mixes.
    user_noise
        Weight of the idiosyncratic part of a user's taste.
    affinity, click_bias, appeal_std
        ``P(click) = sigmoid(affinity*m + b_i + click_bias)`` with ``b_i ~ N(0, appeal_std)``.
    collect_affinity, collect_bias, cart_affinity, cart_bias
        Conditional collect/cart probabilities given a click.
    purchase_affinity, purchase_appeal, purchase_bias
        Conditional purchase probability given the cart.
    browse_mean
        Mean number of items a user browses in one organic moment (Poisson, at least one).
    browse_sharpness
        Inverse temperature of the organic browsing softmax over the click logit.
    drift_eta
        Step of the taste drift toward consumed (clicked) items; 0 disables drift.
    drift_anchor
        Pull back toward the user's initial taste at each consumption, so tastes wander
        around it instead of collapsing (the world stays stationary, and a rising reward
        curve means the recommender learned, not that the users narrowed).
    activity_sigma
        Users are picked with lognormal(0, activity_sigma) activity weights.
    rewards
        Reward weight per action, for expected and oracle rewards.
    shift_at_moment
        Request moment (0-based index) before which every user's taste shifts: moments
        ``0 … shift_at_moment − 1`` see the old tastes, the rest the new ones; 0 = no shift.
    shift_strength
        How far tastes move at the shift: ``u <- normalise((1 − s)·u + s·u_new)``, ``u_new``
        drawn as initial tastes are (from a random stream of its own); 1 = a new taste.
    """

    n_items: int = 400
    n_users: int = 300
    n_top_categories: int = 8
    n_sub_categories: int = 5
    n_brands: int = 48
    n_sellers: int = 60
    latent_dim: int = 16
    top_weight: float = 1.0
    sub_weight: float = 0.8
    brand_weight: float = 0.4
    item_noise: float = 0.6
    null_brand_share: float = 0.1
    user_categories: int = 2
    user_noise: float = 0.5
    affinity: float = 4.0
    click_bias: float = -2.5
    appeal_std: float = 1.0
    collect_affinity: float = 2.0
    collect_bias: float = -3.5
    cart_affinity: float = 3.0
    cart_bias: float = -2.5
    purchase_affinity: float = 2.0
    purchase_appeal: float = 0.5
    purchase_bias: float = -1.5
    browse_mean: float = 3.0
    browse_sharpness: float = 1.0
    drift_eta: float = 0.05
    drift_anchor: float = 0.1
    activity_sigma: float = 0.8
    rewards: RewardWeights = RewardWeights()
    shift_at_moment: int = 0
    shift_strength: float = 1.0

    def __post_init__(self) -> None:
        for name in ("n_items", "n_users", "n_top_categories", "n_sub_categories", "n_brands",
                     "n_sellers", "latent_dim", "user_categories"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"WorldConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.user_categories > self.n_top_categories:
            raise ValueError(f"WorldConfig.user_categories ({self.user_categories}) exceeds "
                             f"n_top_categories ({self.n_top_categories})")
        for name in ("appeal_std", "item_noise", "user_noise", "browse_mean", "browse_sharpness",
                     "drift_eta", "drift_anchor", "activity_sigma"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        if int(self.shift_at_moment) < 0:
            raise ValueError(f"WorldConfig.shift_at_moment must be >= 0 (0 = no shift), got {self.shift_at_moment}")
        if not 0.0 <= self.shift_strength <= 1.0:
            raise ValueError(f"WorldConfig.shift_strength must be in [0, 1], got {self.shift_strength}")
        if not 0.0 <= self.null_brand_share <= 1.0:
            raise ValueError(f"WorldConfig.null_brand_share must be in [0, 1], got {self.null_brand_share}")

    def to_dict(self) -> dict:
        return asdict(self)


# Outcomes given a click: (collect, cart, purchase) and how to get their probability.
_OUTCOMES = [(col, cart, pur) for col in (0, 1) for cart, pur in ((0, 0), (1, 0), (1, 1))]


class SyntheticWorld:
    """Users, items and the known response model of :class:`WorldConfig`.

    Parameters
    ----------
    config
        The world's parameters.
    seed
        Seeds the catalogue and the users; :meth:`respond` and :meth:`browse` draw from the
        generator passed to them, so a run is reproducible from two seeds.
    """

    def __init__(self, config: WorldConfig | None = None, seed: int = 0):
        self.config = config = config or WorldConfig()
        self.seed = seed
        rng = np.random.default_rng(seed)
        d = config.latent_dim
        n_top, n_sub = config.n_top_categories, config.n_sub_categories

        top_dirs = _unit(rng.standard_normal((n_top, d)))
        sub_dirs = _unit(rng.standard_normal((n_top, n_sub, d)))
        brand_dirs = _unit(rng.standard_normal((config.n_brands, d)))
        brand_top = np.arange(config.n_brands) % n_top
        brands_of_top = [np.flatnonzero(brand_top == t) for t in range(n_top)]

        self.item_ids: list[str] = [str(i + 1) for i in range(config.n_items)]
        self.user_ids: list[str] = [str(u + 1) for u in range(config.n_users)]
        self._item_index = {item: i for i, item in enumerate(self.item_ids)}
        self._user_index = {user: u for u, user in enumerate(self.user_ids)}

        tops = rng.integers(0, n_top, config.n_items)
        subs = rng.integers(0, n_sub, config.n_items)
        vectors = np.empty((config.n_items, d))
        self.meta: dict[str, ItemMeta] = {}
        for i, item in enumerate(self.item_ids):
            t, s = int(tops[i]), int(subs[i])
            has_brand = rng.random() >= config.null_brand_share and len(brands_of_top[t]) > 0
            brand = int(rng.choice(brands_of_top[t])) if has_brand else -1
            seller = int(rng.integers(0, config.n_sellers))
            direction = config.top_weight * top_dirs[t] + config.sub_weight * sub_dirs[t, s]
            if brand >= 0:
                direction = direction + config.brand_weight * brand_dirs[brand]
            direction = direction + config.item_noise * rng.standard_normal(d) / np.sqrt(d)
            vectors[i] = direction
            words = [f"style{t + 1}x{int(w)}" for w in rng.integers(0, 6, 2)]
            title = " ".join(["2014", f"line{t + 1}", f"kind{t + 1}x{s + 1}", *words])
            self.meta[item] = ItemMeta(item_id=item, category=f"{t + 1}-{s + 1}",
                                       brand=f"b{brand + 1}" if brand >= 0 else "",
                                       seller=f"s{seller + 1}", title=title)
        self.item_vectors = _unit(vectors)
        self.item_appeal = rng.normal(0.0, config.appeal_std, config.n_items)

        self._top_dirs, self._sub_dirs = top_dirs, sub_dirs
        self.tastes = self._draw_tastes(rng)
        self.initial_tastes = self.tastes.copy()
        activity = rng.lognormal(0.0, config.activity_sigma, config.n_users)
        self.user_activity = activity / activity.sum()
        # The response model of the last user asked about, with the taste it was computed for:
        # one moment asks for it several times (browse, oracle, expected reward, response), and
        # it only changes when that user's taste does.
        self._model_key: tuple[int, bytes] | None = None
        self._model: dict[str, np.ndarray] = {}

    def _draw_tastes(self, rng: np.random.Generator) -> np.ndarray:
        """One unit taste per user: a Dirichlet mix of ``user_categories`` top categories, half
        a sub category of the first, and idiosyncratic noise."""
        config, top_dirs, sub_dirs = self.config, self._top_dirs, self._sub_dirs
        d, n_top, n_sub = config.latent_dim, config.n_top_categories, config.n_sub_categories
        tastes = np.empty((config.n_users, d))
        for u in range(config.n_users):
            liked = rng.choice(n_top, size=config.user_categories, replace=False)
            mix = rng.dirichlet(np.ones(config.user_categories))
            taste = sum(m * top_dirs[t] for m, t in zip(mix, liked))
            taste = taste + 0.5 * sub_dirs[liked[0], rng.integers(0, n_sub)]
            tastes[u] = taste + config.user_noise * rng.standard_normal(d) / np.sqrt(d)
        return _unit(tastes)

    def shift_tastes(self, rng: np.random.Generator, strength: float | None = None) -> None:
        """Move every user toward a new taste drawn from ``rng`` as initial tastes are:
        ``u <- normalise((1 − s)·u + s·u_new)`` (``s`` = ``strength``, default
        ``config.shift_strength``); the result also becomes the taste drift is anchored to.

        >>> world = SyntheticWorld(WorldConfig(n_items=40, n_users=5), seed=1)
        >>> best = [world.oracle_item(u) for u in world.user_ids]
        >>> world.shift_tastes(np.random.default_rng([1, 4]))
        >>> sum(b != world.oracle_item(u) for b, u in zip(best, world.user_ids)) >= 3
        True
        >>> bool(np.allclose(world.tastes, world.initial_tastes))
        True
        """
        s = self.config.shift_strength if strength is None else float(strength)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"shift strength must be in [0, 1], got {s}")
        self.tastes = _unit((1.0 - s) * self.tastes + s * self._draw_tastes(rng))
        self.initial_tastes = self.tastes.copy()

    # -- lookups --------------------------------------------------------------------------
    def item_index(self, item: str | int) -> int:
        if isinstance(item, (int, np.integer)):
            if not 0 <= int(item) < len(self.item_ids):
                raise KeyError(f"item index {item} outside the catalogue of {len(self.item_ids)}")
            return int(item)
        try:
            return self._item_index[item]
        except KeyError:
            raise KeyError(f"unknown item {item!r}: not in the synthetic catalogue") from None

    def user_index(self, user: str | int) -> int:
        if isinstance(user, (int, np.integer)):
            if not 0 <= int(user) < len(self.user_ids):
                raise KeyError(f"user index {user} outside the {len(self.user_ids)} users")
            return int(user)
        try:
            return self._user_index[user]
        except KeyError:
            raise KeyError(f"unknown user {user!r}: not a synthetic user") from None

    def sample_user(self, rng: np.random.Generator) -> str:
        """A user drawn by activity weight."""
        return self.user_ids[int(rng.choice(len(self.user_ids), p=self.user_activity))]

    # -- the response model ---------------------------------------------------------------
    def _match(self, u: int) -> np.ndarray:
        return self.item_vectors @ self.tastes[u]

    def _model_of(self, m: np.ndarray, appeal: np.ndarray) -> dict[str, np.ndarray]:
        """Click logit and the four probabilities of :meth:`action_probabilities`, element-wise
        from the matches ``m`` and appeals of some items (all of them, or a slice)."""
        c = self.config
        click_logit = c.affinity * m + appeal + c.click_bias
        return {
            "click_logit": click_logit,
            "click": _sigmoid(click_logit),
            "collect": _sigmoid(c.collect_affinity * m + c.collect_bias),
            "cart": _sigmoid(c.cart_affinity * m + c.cart_bias),
            "purchase": _sigmoid(c.purchase_affinity * m + c.purchase_appeal * appeal + c.purchase_bias),
        }

    def _response_model(self, u: int) -> dict[str, np.ndarray]:
        """:meth:`_model_of` every item for user index ``u`` at their current taste (the arrays are
        shared: do not modify). Recomputed only when the user or their taste changed since the
        last call."""
        key = (u, self.tastes[u].tobytes())
        if key != self._model_key:
            self._model = self._model_of(self._match(u), self.item_appeal)
            self._model_key = key
        return self._model

    def _click_logits(self, u: int) -> np.ndarray:
        return self._response_model(u)["click_logit"]

    def action_probabilities(self, user: str | int) -> dict[str, np.ndarray]:
        """Per item: P(click), and P(collect|click), P(cart|click), P(purchase|cart)."""
        model = self._response_model(self.user_index(user))
        return {name: model[name].copy() for name in ("click", "collect", "cart", "purchase")}

    def _expected(self, u: int) -> np.ndarray:
        """:meth:`expected_rewards` of user index ``u``, shared with the cache (do not modify)."""
        p = self._response_model(u)
        expected = p.get("expected")
        if expected is None:
            w = self.config.rewards
            given_click = np.zeros_like(p["click"])
            for collect, cart, purchase in _OUTCOMES:
                prob = (p["collect"] if collect else 1 - p["collect"])
                prob = prob * (p["cart"] if cart else 1 - p["cart"])
                if cart:
                    prob = prob * (p["purchase"] if purchase else 1 - p["purchase"])
                taken = [w.click] + [w.collect] * collect + [w.cart] * cart + [w.purchase] * purchase
                reward = max(taken)
                given_click += prob * reward
            expected = p["expected"] = p["click"] * given_click
        return expected

    def expected_rewards(self, user: str | int) -> np.ndarray:
        """Exact expected reward of every item for ``user`` at their current taste."""
        return self._expected(self.user_index(user)).copy()

    def expected_reward(self, user: str | int, item: str | int) -> float:
        return float(self._expected(self.user_index(user))[self.item_index(item)])

    def oracle_item(self, user: str | int) -> str:
        """The item with the highest expected reward for ``user`` now (the best policy's pick)."""
        return self.item_ids[int(np.argmax(self._expected(self.user_index(user))))]

    def oracle_reward(self, user: str | int) -> float:
        return float(np.max(self._expected(self.user_index(user))))

    def reward_of(self, actions: Sequence[str]) -> float:
        """Realised reward of a set of actions on one item."""
        return max((self.config.rewards.weight(a) for a in actions), default=0.0)

    def respond(self, user: str | int, item: str | int, rng: np.random.Generator,
                drift: bool = True) -> list[str]:
        """The user's actions on a shown item (empty when they ignore it); drifts their taste
        toward the item when they click, unless ``drift`` is False."""
        u, i = self.user_index(user), self.item_index(item)
        p = self._probabilities_of(u, i)
        if rng.random() >= p["click"]:
            return []
        return self._after_click(u, i, p, rng, drift)

    def _probabilities_of(self, u: int, i: int) -> dict[str, float]:
        """The four probabilities of item ``i`` for user index ``u``: from the cached model when
        the taste is the one it was computed for, else (a browse after a click) from this item's
        elements only, which the element-wise model maps to the same values."""
        if (u, self.tastes[u].tobytes()) == self._model_key:
            model = self._model
        else:
            model = self._model_of(self._match(u)[i:i + 1], self.item_appeal[i:i + 1])
            i = 0
        return {name: float(model[name][i]) for name in ("click", "collect", "cart", "purchase")}

    def _after_click(self, u: int, i: int, p: dict[str, float], rng: np.random.Generator,
                     drift: bool) -> list[str]:
        actions = ["click"]
        if rng.random() < p["collect"]:
            actions.append("collect")
        if rng.random() < p["cart"]:
            actions.append("cart")
            if rng.random() < p["purchase"]:
                actions.append("purchase")
        if drift:
            self.consume(u, i)
        return actions

    def browse(self, user: str | int, rng: np.random.Generator, drift: bool = True) -> list[tuple[str, str]]:
        """One organic moment: the user opens items drawn by softmax over their click logit
        (each opened item is a click) and may collect, cart or buy them. Returns
        ``(item_id, action)`` pairs in the order they happen."""
        u = self.user_index(user)
        n = max(1, int(rng.poisson(self.config.browse_mean)))
        logits = self.config.browse_sharpness * self._click_logits(u)
        weights = np.exp(logits - logits.max())
        chosen = rng.choice(len(self.item_ids), size=n, p=weights / weights.sum())
        out: list[tuple[str, str]] = []
        for i in chosen:
            p = self._probabilities_of(u, int(i))
            out.extend((self.item_ids[int(i)], a) for a in self._after_click(u, int(i), p, rng, drift))
        return out

    def consume(self, user: str | int, item: str | int) -> None:
        """Taste drift: ``u <- normalise(u + drift_eta * v_item + drift_anchor * u_initial)``."""
        eta = self.config.drift_eta
        if eta > 0:
            u, i = self.user_index(user), self.item_index(item)
            anchor = self.config.drift_anchor * self.initial_tastes[u]
            self.tastes[u] = _unit(self.tastes[u] + eta * self.item_vectors[i] + anchor)

    def reset_tastes(self) -> None:
        """Undo all drift."""
        self.tastes = self.initial_tastes.copy()

    # -- files in the Tmall format --------------------------------------------------------
    def write_products_csv(self, path: str | Path) -> Path:
        """The catalogue as a Tmall product file (UTF-8): item_id,title,pict_url,category,brand_id,seller_id."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["item_id", "title", "pict_url", "category", "brand_id", "seller_id"])
            for item in self.item_ids:
                m = self.meta[item]
                writer.writerow([item, m.title, f"http://img.example.invalid/{item}.jpg", m.category,
                                 m.brand or "null", m.seller])
        return path

    def generate_log(self, n_events: int, seed: int = 0, start_ts: float = SYNTHETIC_EPOCH,
                     moment_step_s: float = 60.0) -> list[tuple[str, str, str, float]]:
        """``n_events`` organic ``(item_id, user_id, action, ts)`` rows in time order, from a
        copy of the current tastes (this world is left unchanged)."""
        if n_events < 0:
            raise ValueError(f"n_events must be >= 0, got {n_events}")
        rng = np.random.default_rng(seed)
        saved = self.tastes.copy()
        rows: list[tuple[str, str, str, float]] = []
        try:
            ts = start_ts
            while len(rows) < n_events:
                user = self.sample_user(rng)
                for item, action in self.browse(user, rng):
                    rows.append((item, user, action, ts))
                ts += moment_step_s
        finally:
            self.tastes = saved
        return rows[:n_events]

    def write_log_csv(self, path: str | Path, n_events: int, seed: int = 0,
                      start_ts: float = SYNTHETIC_EPOCH, moment_step_s: float = 60.0) -> Path:
        """Organic behaviour as a Tmall log file: item_id,user_id,action,vtime with ``i``/``u``
        prefixes, ``alipay`` for purchase and vtime like ``2014/9/18 15:03`` (UTC)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["item_id", "user_id", "action", "vtime"])
            for item, user, action, ts in self.generate_log(n_events, seed, start_ts, moment_step_s):
                t = time.gmtime(ts)
                vtime = f"{t.tm_year}/{t.tm_mon}/{t.tm_mday} {t.tm_hour}:{t.tm_min:02d}"
                writer.writerow([f"i{item}", f"u{user}", "alipay" if action == "purchase" else action, vtime])
        return path


def reference_policy_rewards(world: SyntheticWorld, moments: int = 2000, seed: int = 0,
                             item_dim: int = 32) -> dict[str, float]:
    """Mean expected reward per recommendation of three reference policies on the same moments:
    ``random`` (uniform item), ``history_similar`` (the item whose hashed metadata vector is
    closest by cosine to the user's state from their browsing history, what plain cosine
    retrieval does) and ``oracle``. Each moment: a user browses, then is recommended an item.
    Tastes drift with browsing only, so all three policies face the same users; the world's
    tastes are restored afterwards."""
    rng = np.random.default_rng(seed)
    items = ItemEncoder(item_dim, world.meta)
    states = StateEncoder(items)
    item_matrix = items.encode_many(world.item_ids)
    histories: dict[str, list[HistoryEntry]] = {}
    totals = {"random": 0.0, "history_similar": 0.0, "oracle": 0.0}
    saved = world.tastes.copy()
    try:
        for t in range(moments):
            user = world.sample_user(rng)
            hist = histories.setdefault(user, [])
            hist.extend(HistoryEntry(item, action, float(t)) for item, action in world.browse(user, rng))
            del hist[:-30]
            rewards = world.expected_rewards(user)
            totals["random"] += float(rewards.mean())
            state = states.encode(hist)
            totals["history_similar"] += float(rewards[int(np.argmax(item_matrix @ state))])
            totals["oracle"] += float(rewards.max())
    finally:
        world.tastes = saved
    return {name: total / max(1, moments) for name, total in totals.items()}

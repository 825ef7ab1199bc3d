"""What the Locust scenario sends and how it judges answers, without importing Locust (which monkey-patches the
process with gevent on import): payloads from a real data file, the /score answer check, the env settings.

loadtest/locustfile.py imports this as a sibling module (Locust puts the locustfile's folder on sys.path), so
the pair works from the repository and mounted as a folder into the official Locust image (docker-compose.yml). The
data file is read by `dare_common.taobao.iter_rows` (the standard library only: the Locust image has no polars), so
it obeys the rules of `dare load`; docker-compose.yml mounts dare_common/ beside loadtest/.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from dare_common.taobao import SAMPLE as DEFAULT_DATA
from dare_common.taobao import iter_rows

SCORE_PATH = "/score"


@dataclass(frozen=True)
class Payloads:
    """What requests are built from: real user ids and real (item, category) pairs, drawn from one data file."""

    users: list[str]
    items: list[tuple[int, int]]  # one entry per event, so popular items are drawn more often, as in real traffic
    distinct: int  # how many different (item, category) pairs `items` holds

    @classmethod
    def from_csv(cls, path: Path, max_users: int, seed: int) -> Payloads:
        users: dict[str, None] = {}
        items: list[tuple[int, int]] = []
        for user, item, cate, _behaviour, _ts in iter_rows(path):
            users.setdefault(str(user), None)
            items.append((item, cate))
        if not users or not items:
            raise ValueError(f"{path}: no complete user_id,item_id,category_id,behavior_type,timestamp rows")
        rng = random.Random(seed)
        chosen = list(users)
        rng.shuffle(chosen)
        return cls(users=chosen[:max_users], items=items, distinct=len(set(items)))

    def request(self, rng: random.Random, candidates: int, model: str) -> dict[str, object]:
        """One /score body: a random real user and `candidates` different real items drawn by popularity (an ad
        server sends different ads; the service scores equal candidates once), repeated only when the data holds
        fewer."""
        want = min(candidates, self.distinct)
        # Every pair when the data holds no more than asked for (drawing would wait for the rarest one).
        picked: dict[tuple[int, int], None] = dict.fromkeys(self.items) if want == self.distinct else {}
        while len(picked) < want:
            picked.update(dict.fromkeys(rng.choices(self.items, k=want - len(picked))))
        pairs = list(picked)[:want] + rng.choices(self.items, k=candidates - want)
        body: dict[str, object] = {
            "user_id": rng.choice(self.users),
            "candidates": [{"item_id": i, "category_id": c} for i, c in pairs],
        }
        if model:
            body["model"] = model
        return body


def validate_score_body(body: object, n_candidates: int, model: str) -> str | None:
    """Why a /score answer is wrong, or None when it is right: one probability in (0, 1) per candidate."""
    if not isinstance(body, dict):
        return "body is not a JSON object"
    scores = body.get("scores")
    if not isinstance(scores, list):
        return f"no 'scores' list in the answer (keys: {sorted(body)})"
    if len(scores) != n_candidates:
        return f"{len(scores)} scores for {n_candidates} candidates"
    bad = [s for s in scores if isinstance(s, bool) or not isinstance(s, (int, float)) or math.isnan(s)
           or not (0.0 < s < 1.0)]  # fmt: skip
    if bad:
        return f"{len(bad)} scores outside (0, 1), e.g. {bad[0]!r}"
    if model and body.get("model") != model:
        return f"asked for model {model!r}, answered by {body.get('model')!r}"
    return None


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


@dataclass(frozen=True)
class ScenarioSettings:
    """The DARE_LOADTEST_* variables (see loadtest/locustfile.py), read once per Locust process."""

    data: Path
    model: str
    candidates: int
    max_users: int
    rate: float
    shape: str
    ramp_users: int
    ramp_seconds: float
    raw: str
    seed: int
    token: str = ""

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header the service wants when it has DARE_API_TOKEN (docker-compose.yml sets it)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @classmethod
    def from_env(cls) -> ScenarioSettings:
        settings = cls(
            data=Path(os.environ.get("DARE_LOADTEST_DATA") or DEFAULT_DATA),
            model=os.environ.get("DARE_LOADTEST_MODEL", ""),
            candidates=env_int("DARE_LOADTEST_CANDIDATES", 100),
            max_users=env_int("DARE_LOADTEST_MAX_USERS", 2000),
            rate=env_float("DARE_LOADTEST_RATE", 0.0),
            shape=os.environ.get("DARE_LOADTEST_SHAPE", ""),
            ramp_users=env_int("DARE_LOADTEST_RAMP_USERS", 32),
            ramp_seconds=env_float("DARE_LOADTEST_RAMP_SECONDS", 30.0),
            raw=os.environ.get("DARE_LOADTEST_RAW", ""),
            seed=env_int("DARE_LOADTEST_SEED", 0),
            token=os.environ.get("DARE_LOADTEST_TOKEN", ""),
        )
        if settings.candidates < 1 or settings.max_users < 1 or settings.ramp_users < 1:
            raise ValueError("DARE_LOADTEST_CANDIDATES, _MAX_USERS and _RAMP_USERS must be >= 1")
        if settings.shape not in ("", "ramp"):
            raise ValueError(f"DARE_LOADTEST_SHAPE must be empty or 'ramp', got {settings.shape!r}")
        return settings

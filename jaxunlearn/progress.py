"""Progress bars for long work (training runs, sweeps): a thin, lazily created tqdm bar."""
from __future__ import annotations


class Progress:
    """A tqdm bar over models: models done, models/s, ETA."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "model"):
        self.total, self.desc, self.enabled, self.unit, self.bar = total, desc, enabled, unit, None

    def __call__(self, done: float, total: int | None = None) -> None:
        if self.bar is None:  # created on first progress, so an early error prints only its own line
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, disable=not self.enabled,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.1f}/{total} " + self.unit
                            + "s [{elapsed}<{remaining}, {rate_fmt}]")
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()

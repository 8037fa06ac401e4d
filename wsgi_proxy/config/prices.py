"""What a response cost: a price table per model and service tier, and the arithmetic.

Prices are in US dollars per million tokens (and per thousand tool calls), as OpenAI publishes
them. :data:`DEFAULT_PRICES` is a dated copy of OpenAI's list for common models; the configuration
file's ``[prices]`` replaces entries of it, and an upstream's own ``prices`` (negotiated ones)
replace those for what that upstream serves. Costs are kept as whole nano-dollars (1e-9 USD), so
that totals add up exactly in any store.
"""

from __future__ import annotations

import re
import typing as t

from pydantic import BaseModel, ConfigDict, Field

from ..wire.usage import Usage

__all__ = ["DEFAULT_PRICES", "DEFAULT_PRICES_DATE", "ModelPrice", "Price", "PriceTable", "usd"]

#: When :data:`DEFAULT_PRICES` was copied from OpenAI's pricing page: check it against today's.
DEFAULT_PRICES_DATE = "2025-08-07"

_NANO = 1e9
_PER_MILLION = _NANO / 1e6  # nano-dollars per token, per dollar per million tokens
_PER_THOUSAND = _NANO / 1e3  # nano-dollars per call, per dollar per thousand calls
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class Price(BaseModel):
    """One model's prices on one tier. A part without a price of its own costs what its whole
    does: cached input and cache writes cost ``input``, audio costs ``input`` or ``output``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(default=0.0, ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)
    input_image: float | None = Field(default=None, ge=0)
    input_audio: float | None = Field(default=None, ge=0)
    output_audio: float | None = Field(default=None, ge=0)
    #: US dollars per thousand calls of each tool.
    web_search_calls: float = Field(default=0.0, ge=0)
    file_search_calls: float = Field(default=0.0, ge=0)
    code_interpreter_calls: float = Field(default=0.0, ge=0)
    image_generation_calls: float = Field(default=0.0, ge=0)

    def cost(self, usage: Usage) -> int:
        """What ``usage`` costs at these prices, in nano-dollars."""

        def part(price: float | None) -> float:
            return self.input if price is None else price

        inputs = (
            (usage.cached_input_tokens, part(self.cached_input)),
            (usage.cache_write_tokens, part(self.cache_write)),
            (usage.input_image_tokens, part(self.input_image)),
            (usage.input_audio_tokens, part(self.input_audio)),
        )
        plain_input = max(0, usage.input_tokens - sum(count for count, _ in inputs))
        output_audio = self.output if self.output_audio is None else self.output_audio
        plain_output = max(0, usage.output_tokens - usage.output_audio_tokens)
        tokens = (
            plain_input * self.input
            + sum(count * price for count, price in inputs)
            + plain_output * self.output
            + usage.output_audio_tokens * output_audio
        )
        calls = (
            usage.web_search_calls * self.web_search_calls
            + usage.file_search_calls * self.file_search_calls
            + usage.code_interpreter_calls * self.code_interpreter_calls
            + usage.image_generation_calls * self.image_generation_calls
        )
        return round(tokens * _PER_MILLION + calls * _PER_THOUSAND)


class ModelPrice(Price):
    """A model's standard prices, and those of other service tiers (``flex``, ``priority``, ``batch``…)
    where they differ; a tier not listed costs the standard prices."""

    tiers: dict[str, Price] = {}

    def on(self, tier: str | None) -> Price:
        return self.tiers.get(tier, self) if tier else self


def _price(
    input: float, cached_input: float | None, output: float, **tiers: tuple[float, float | None, float]
) -> ModelPrice:
    return ModelPrice(
        input=input,
        cached_input=cached_input,
        output=output,
        tiers={name: Price(input=i, cached_input=c, output=o) for name, (i, c, o) in tiers.items()},
    )


#: OpenAI's list prices of :data:`DEFAULT_PRICES_DATE` (USD per million tokens: input, cached
#: input, output; flex and priority tiers where they exist).
DEFAULT_PRICES: t.Mapping[str, ModelPrice] = {
    "gpt-5": _price(1.25, 0.125, 10.0, flex=(0.625, 0.0625, 5.0), priority=(2.5, 0.25, 20.0)),
    "gpt-5-mini": _price(0.25, 0.025, 2.0, flex=(0.125, 0.0125, 1.0), priority=(0.45, 0.045, 3.6)),
    "gpt-5-nano": _price(0.05, 0.005, 0.4, flex=(0.025, 0.0025, 0.2)),
    "gpt-4.1": _price(2.0, 0.5, 8.0, priority=(3.5, 0.875, 14.0)),
    "gpt-4.1-mini": _price(0.4, 0.1, 1.6, priority=(0.7, 0.175, 2.8)),
    "gpt-4.1-nano": _price(0.1, 0.025, 0.4, priority=(0.2, 0.05, 0.8)),
    "gpt-4o": _price(2.5, 1.25, 10.0, priority=(4.25, 2.125, 17.0)),
    "gpt-4o-mini": _price(0.15, 0.075, 0.6, priority=(0.25, 0.125, 1.0)),
    "o3": _price(2.0, 0.5, 8.0, flex=(1.0, 0.25, 4.0), priority=(3.5, 0.875, 14.0)),
    "o4-mini": _price(1.1, 0.275, 4.4, flex=(0.55, 0.1375, 2.2), priority=(2.0, 0.5, 8.0)),
    "o3-mini": _price(1.1, 0.55, 4.4),
    "o1": _price(15.0, 7.5, 60.0),
    "text-embedding-3-small": _price(0.02, None, 0.0),
    "text-embedding-3-large": _price(0.13, None, 0.0),
}


class PriceTable:
    """The prices in force: an upstream's own, then the file's, then the defaults.

    :param prices: model name to prices (the defaults with the file's entries over them).
    :param by_upstream: an upstream's name to its own prices, for models it prices differently.
    """

    def __init__(
        self,
        prices: t.Mapping[str, ModelPrice] = DEFAULT_PRICES,
        by_upstream: t.Mapping[str, t.Mapping[str, ModelPrice]] | None = None,
    ) -> None:
        self._prices = dict(prices)
        self._by_upstream = {name: dict(table) for name, table in (by_upstream or {}).items()}

    def price(self, model: str | None, upstream: str | None, tier: str | None) -> Price | None:
        """The prices of ``model`` (or of the model it is a dated snapshot of, such as
        ``gpt-4o-2024-08-06``) on ``tier`` at ``upstream``, or None when nothing prices it."""
        if not model:
            return None
        tables = [self._by_upstream.get(upstream or "", {}), self._prices]
        for name in (model, _SNAPSHOT.sub("", model)):
            for table in tables:
                entry = table.get(name)
                if entry is not None:
                    return entry.on(tier)
        return None

    def cost(self, model: str | None, upstream: str | None, tier: str | None, usage: Usage) -> int | None:
        """What ``usage`` cost in nano-dollars, or None when the model has no price."""
        price = self.price(model, upstream, tier)
        return None if price is None else price.cost(usage)


def usd(nano: int) -> float:
    """Nano-dollars as US dollars (for log lines and reports)."""
    return round(nano / _NANO, 9)
